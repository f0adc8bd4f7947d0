"""Where model weights and evaluation data live.

Default: ``../shared/assets`` next to the repository checkout; override with the
``REIDFLEET_ASSETS`` environment variable (or each tool's ``--assets`` option). Data is read by
path and never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ASSETS = REPO_ROOT.parent / "shared" / "assets"


def assets_dir(override: str | os.PathLike[str] | None = None) -> Path:
    value = override or os.environ.get("REIDFLEET_ASSETS")
    return Path(value).expanduser().resolve() if value else DEFAULT_ASSETS


def model_path(*parts: str, assets: str | os.PathLike[str] | None = None) -> Path:
    return assets_dir(assets) / "models" / Path(*parts)


def data_path(*parts: str, assets: str | os.PathLike[str] | None = None) -> Path:
    return assets_dir(assets) / "data" / Path(*parts)


def require(path: Path, what: str) -> Path:
    """Fail with a message that says which setting to change, not a bare FileNotFoundError."""
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. Set REIDFLEET_ASSETS (or --assets) to the folder that holds "
            f"models/ and data/ (default {DEFAULT_ASSETS})."
        )
    return path
