"""Write manifests and package model directories into versioned artifacts.

An artifact is a directory with the model files and ``manifest.json`` (schemas.model_manifest):
what the fleet signs and rolls out, and what the appliance verifies before it loads anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.presets import PRESETS, ModelPreset
from schemas.model_manifest import MANIFEST_NAME, ArtifactFile, ModelManifest, sha256_file


def build_manifest(model_dir: Path, preset: ModelPreset, version: str, metrics: dict[str, float] | None = None,
                   precision: str | None = None) -> ModelManifest:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    if not files:
        raise FileNotFoundError(f"no model files in {model_dir}")
    if not (model_dir / preset.entrypoint).is_file():
        raise FileNotFoundError(f"{model_dir} has no {preset.entrypoint} (preset {preset.model_id})")
    return ModelManifest(
        model_id=preset.model_id,
        version=version,
        task=preset.task,
        precision=precision or preset.precision,
        entrypoint=preset.entrypoint,
        input=preset.input,
        output=preset.output,
        classes=list(preset.classes),
        metrics=dict(metrics or {}),
        source=preset.source,
        license=preset.license,
        files=[
            ArtifactFile(path=p.relative_to(model_dir).as_posix(), sha256=sha256_file(p), size_bytes=p.stat().st_size)
            for p in files
        ],
    )


def write_manifest(model_dir: Path, manifest: ModelManifest) -> Path:
    path = model_dir / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def package(src_dir: Path, out_dir: Path, preset_name: str, version: str,
            metrics: dict[str, float] | None = None) -> ModelManifest:
    """Copy a model directory into ``out_dir`` with a fresh manifest (the source may be read-only)."""
    if preset_name not in PRESETS:
        raise KeyError(f"unknown preset {preset_name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[preset_name]
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in src_dir.rglob("*"):
        if p.is_file() and p.name != MANIFEST_NAME:
            dst = out_dir / p.relative_to(src_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
    manifest = build_manifest(out_dir, preset, version, metrics)
    write_manifest(out_dir, manifest)
    return manifest
