"""Output folders: checked to be writable before any work starts, without creating anything."""

from __future__ import annotations

import tempfile
from pathlib import Path

from foundation.errors import UserInputError


def require_output_dir(output_dir: str | Path | None, flag: str = "--output-dir") -> str | Path:
    """The given output folder, or one sentence asking for it."""
    if not output_dir:
        raise UserInputError(f"No output folder given; pass {flag} DIR.")
    return output_dir


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """The absolute output folder, after checking it can be written, without creating anything."""
    folder = Path(path).expanduser().resolve()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(
            f"Cannot write to the output folder '{folder}': '{existing}' is a file, not a folder; "
            f"choose another {flag}."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):  # unlinked at once: leaves nothing behind
            pass
    except OSError as error:
        raise UserInputError(
            f"Cannot write to the output folder '{folder}' ({error.strerror}); choose another {flag}."
        ) from error
    return folder
