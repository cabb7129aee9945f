"""The Quantum Pass badge: the project's SVG identity card, copied next to a run's outputs with a small manifest."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from foundation.atomic_files import write_bytes_atomic, write_json_atomic
from foundation.output_names import BADGE_FILE, BADGE_MANIFEST

BADGE_ID = "QNTM-42A9"
# The project root, whether the package is imported from a checkout or from an editable install of it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BADGE_ASSET = PROJECT_ROOT / "assets" / "badges" / BADGE_FILE


def badge_asset() -> Path:
    """The packaged SVG; a missing asset is a broken checkout, so it raises."""
    if not BADGE_ASSET.is_file():
        raise FileNotFoundError(f"the Quantum Pass badge asset is missing: {BADGE_ASSET}")
    return BADGE_ASSET


def install_badge(folder: str | Path) -> dict:
    """Copy the badge SVG into `folder` and write `project_badge.json` beside it; returns the manifest."""
    folder = Path(folder)
    source = badge_asset()
    copy = write_bytes_atomic(folder / BADGE_FILE, source.read_bytes())
    manifest = {
        "badge_id": BADGE_ID,
        "asset": str(copy.resolve()),
        "copied_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
    }
    write_json_atomic(folder / BADGE_MANIFEST, manifest)
    return manifest
