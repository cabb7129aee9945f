"""What an exact resume needs beyond Lightning's checkpoint: atomic files and the random number generators' state.

Lightning saves the weights, the optimizer, the scheduler, the loop progress and (through the DataModule) the place in
the training order, but not the RNG state that draws the LoRA dropout masks, so a resumed fit would drop other units
than the uninterrupted one. And its local writes go through a temp file in the system temp folder, which is renamed
into place only when both lie on one file system (on a cluster `/tmp` is often node-local): a kill during the copy
leaves half a `last.ckpt`. `AtomicCheckpointIO` writes beside the target and renames.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from foundation.atomic_files import write_bytes_atomic


def random_states(device: torch.device | None = None) -> dict:
    """The state of every generator a training step may draw from: torch (CPU and this CUDA device), numpy, random.

    Held as tensors and plain numbers, so the checkpoint loads with `torch.load(weights_only=True)`, as Lightning
    loads it.
    """
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "python": [int(version), list(internal), gauss_next],
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_random_states(states: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(states["torch"])
    keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into memory, then one atomic write beside the target: a kill leaves the old file or the new."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        write_bytes_atomic(path, buffer.getvalue())
        # A write killed before its rename leaves its hidden temp file (never a half checkpoint): drop such leftovers.
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


class PeriodicModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (e.g. `every_n_train_steps: 10`, `save_last: true`) that also writes `last.ckpt`
    when fit ends, so that it always holds the final weights once fit is done.

    With a step trigger Lightning writes `last.ckpt` only at multiples of the interval: the steps after the last
    multiple would be missing from it, and `evaluate.py --adapter checkpoints/last.ckpt` would read an earlier model.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Private helpers of ModelCheckpoint, the ones its own triggers call; stable since Lightning 1.x.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
