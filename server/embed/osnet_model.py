"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019), inference only.

Written for this project from the paper's architecture, with module names laid out so torchreid's
published state dicts load with ``strict=True`` (every backbone tensor must be used; only the
training-time ``classifier.*`` head is dropped, after its shape is checked). It needs nothing but
``torch``: torchreid itself drags in torchvision, gdown and tensorboard, and torchvision does not
install beside the CPU torch wheel the server uses. ``tests/server`` and ``docs/server-models.md``
record the numerical check against torchreid's own module.

Structure (width multiplier w: channels 64w, 256w, 384w, 512w):
  conv1 7×7/2 → maxpool 3×3/2 → conv2 (2 OSBlocks + 1×1 conv + avgpool/2) → conv3 (same)
  → conv4 (2 OSBlocks) → conv5 1×1 → global average pool → fc (Linear 512, BN1d, ReLU).
An OSBlock has 1×1 reduce (÷4), four streams of 1..4 "lite" 3×3 convs (1×1 linear + depthwise 3×3),
a channel gate shared by the streams (unified aggregation gate), 1×1 expand and a residual.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

INPUT_HEIGHT, INPUT_WIDTH = 256, 128  # the person crop size torchreid trains and serves OSNet at
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
}


class ConvBn(nn.Module):
    """conv (no bias) → BN → optional ReLU; after :func:`fold_batchnorm` the BN is an Identity."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class LiteConv3x3(nn.Module):
    """1×1 linear conv, then depthwise 3×3, BN, ReLU (the "Lite 3×3" unit of the paper)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv2(self.conv1(x))), inplace=True)


class ChannelGate(nn.Module):
    """Unified aggregation gate: GAP → 1×1 (÷16) → ReLU → 1×1 → sigmoid, multiplied onto the input."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.adaptive_avg_pool2d(x, 1)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g), inplace=True)))
        return x * g


class OSBlock(nn.Module):
    def __init__(self, cin: int, cout: int, reduction: int = 4) -> None:
        super().__init__()
        mid = cout // reduction
        self.conv1 = ConvBn(cin, mid, 1)
        self.conv2a = LiteConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(4)))
        self.gate = ChannelGate(mid)
        self.conv3 = ConvBn(mid, cout, 1, relu=False)
        self.downsample = ConvBn(cin, cout, 1, relu=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        streams = self.gate(self.conv2a(x1)) + self.gate(self.conv2b(x1))
        streams = streams + self.gate(self.conv2c(x1)) + self.gate(self.conv2d(x1))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(streams) + identity)


def _stage(cin: int, cout: int, blocks: int, reduce: bool) -> nn.Sequential:
    layers: list[nn.Module] = [OSBlock(cin, cout)] + [OSBlock(cout, cout) for _ in range(blocks - 1)]
    if reduce:  # transition: 1×1 conv then 2×2 average pooling
        layers.append(nn.Sequential(ConvBn(cout, cout, 1), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(nn.Module):
    """Backbone + 512-d embedding head (the vector torchreid's FeatureExtractor returns in eval mode)."""

    def __init__(self, arch: str = "osnet_x0_25", feature_dim: int = 512) -> None:
        super().__init__()
        if arch not in WIDTHS:
            raise ValueError(f"unknown OSNet architecture {arch!r}; known: {', '.join(WIDTHS)}")
        c = WIDTHS[arch]
        self.arch = arch
        self.feature_dim = feature_dim
        self.conv1 = ConvBn(3, c[0], 7, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _stage(c[0], c[1], 2, reduce=True)
        self.conv3 = _stage(c[1], c[2], 2, reduce=True)
        self.conv4 = _stage(c[2], c[3], 2, reduce=False)
        self.conv5 = ConvBn(c[3], c[3], 1)
        self.fc = nn.Sequential(nn.Linear(c[3], feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class StateDictMismatch(ValueError):
    """A checkpoint whose tensors do not fit the architecture one for one."""


def load_torchreid_state_dict(model: OSNet, state: dict[str, torch.Tensor]) -> int:
    """Load a torchreid checkpoint strictly; returns the number of backbone tensors loaded.

    Accepts a bare state dict or torchreid's ``{"state_dict": ...}`` checkpoint, with or without
    DataParallel's ``module.`` prefix. The classifier (training head, one row per training identity)
    is dropped after checking it is a 2-D matrix over the feature dim; anything else missing,
    unexpected or mis-shaped is an error naming the tensors, never a silent skip.
    """
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise StateDictMismatch("checkpoint is not a non-empty state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cls_w = state.pop("classifier.weight", None)
    state.pop("classifier.bias", None)
    if cls_w is not None and (cls_w.ndim != 2 or cls_w.shape[1] != model.feature_dim):
        raise StateDictMismatch(f"classifier.weight has shape {tuple(cls_w.shape)}, expected (*, {model.feature_dim})")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:4])})")
        raise StateDictMismatch(f"checkpoint does not fit {model.arch}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return len(state)


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new_w = weight * scale.reshape(shape)
    base = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return new_w, (base - bn.running_mean) * scale + bn.bias


@torch.no_grad()
def fold_batchnorm(model: OSNet) -> OSNet:
    """An eval-only copy with every BatchNorm folded into the conv/linear before it (fewer memory passes).

    The inputs of the depthwise convs are unaffected, so the result is the same function up to
    float rounding; ``tests/server`` checks that.
    """
    fused = copy.deepcopy(model).eval()
    for m in fused.modules():
        if isinstance(m, ConvBn):
            conv_bn = m.conv
        elif isinstance(m, LiteConv3x3):
            conv_bn = m.conv2
        else:
            continue
        if isinstance(m.bn, nn.BatchNorm2d):
            w, b = _fold(conv_bn.weight, conv_bn.bias, m.bn)
            conv_bn.weight = nn.Parameter(w)
            conv_bn.bias = nn.Parameter(b)
            m.bn = nn.Identity()
    lin, bn = fused.fc[0], fused.fc[1]
    if isinstance(bn, nn.BatchNorm1d):
        w, b = _fold(lin.weight, lin.bias, bn)
        lin.weight, lin.bias = nn.Parameter(w), nn.Parameter(b)
        fused.fc[1] = nn.Identity()
    return fused
