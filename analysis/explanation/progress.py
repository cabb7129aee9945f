"""What makes an explanation run resumable and shardable: the progress store and the shard assignment.

Every finished example is written at once to `<output-dir>/.progress/<index>.json` (atomically); a rerun with the
same settings reads those back and recomputes nothing. With N shards, process i explains the examples whose index
is i modulo N into the same folder; the process that finds every example there merges them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from foundation.atomic_files import to_json_ready, write_json_atomic
from foundation.errors import UserInputError


@dataclass(frozen=True)
class ShardAssignment:
    """Which examples this process explains. `distributed`: launched by torchrun, so ranks can wait for each other
    (rank 0 validates the progress folder first and merges last); otherwise each shard is an independent process
    (a SLURM array task) and whichever finds every example done merges."""

    index: int = 0
    count: int = 1
    distributed: bool = False

    @classmethod
    def resolve(cls, shard_index: int | None, num_shards: int | None) -> ShardAssignment:
        """The explicit shard (both given), else torchrun's RANK / WORLD_SIZE, else the only shard."""
        if (num_shards is None) != (shard_index is None):
            raise UserInputError("Give --num-shards and --shard-index together (or neither).")
        if num_shards is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world > 1:
                return cls(int(os.environ.get("RANK", "0")), world, distributed=True)
            return cls()
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise UserInputError(
                f"--shard-index {shard_index} is not in 0..{num_shards - 1} for --num-shards {num_shards}; "
                "give each of N processes a different index from 0 to N - 1."
            )
        return cls(shard_index, num_shards)

    def indices(self, example_count: int) -> range:
        return range(self.index, example_count, self.count)

    @property
    def merger(self) -> bool:
        """Whether this process writes the final files even if it must compute missing examples itself."""
        return self.count == 1 or (self.distributed and self.index == 0)

    def barrier(self) -> None:
        """Wait for every rank (torchrun only); the process group is created on first use (gloo runs anywhere)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


class ProgressStore:
    """One JSON per finished example, valid only for the run settings recorded in `run.json`."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, shard: ShardAssignment, note: Callable[[str], None]):
        """The store for these settings: progress from other settings is discarded (rank 0 decides, first)."""
        store = cls(folder)
        if shard.index != 0:
            shard.barrier()  # rank 0 validates (or discards) the progress folder first
        fingerprint = json.loads(json.dumps(to_json_ready(fingerprint)))  # compare as it reads back
        run_file = folder / "run.json"
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                previous = None
            if previous != fingerprint:
                shutil.rmtree(folder)
                note(f"discarded the partial results in {folder}: they came from a run with other settings")
        write_json_atomic(run_file, fingerprint)
        if shard.index == 0:
            shard.barrier()
        return store

    def load(self, index: int, text: str) -> dict | None:
        path = self.folder / f"{index}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # missing, or damaged outside our atomic writes: recompute it
        return record if record.get("text") == text else None

    def save(self, index: int, record: dict) -> dict:
        """Write the record; returns it as it reads back (what a resumed run gets, float for float)."""
        path = write_json_atomic(self.folder / f"{index}.json", record)
        return json.loads(path.read_text())
