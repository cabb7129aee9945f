"""Callback: export the trained LoRA adapter as a peft folder at the end of fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from foundation.atomic_files import atomic_folder
from foundation.output_names import ADAPTER_DIR, CLASSIFICATION_FILE


def write_adapter(module, directory: Path, prompt: dict | None = None) -> Path:
    """Atomically write `module.backbone`'s adapter (peft `save_pretrained`) plus the label/prompt it expects."""
    directory = Path(directory)
    with atomic_folder(directory) as staging:
        module.backbone.save_pretrained(staging)
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        # peft records the local cache path of the base; record the name users pass instead, so it is portable.
        config["base_model_name_or_path"] = module.hparams.model_name
        config_path.write_text(json.dumps(config, indent=2))
        meta = {
            "base_model": module.hparams.model_name,
            "label_names": module.label_names,
            "label_token_ids": module.label_token_ids.tolist(),
            **(prompt or {}),
        }
        (staging / CLASSIFICATION_FILE).write_text(json.dumps(meta, indent=2))
    return directory


class ExportAdapter(L.Callback):
    """Writes `<dirpath or default_root_dir>/lora_adapter/` when fit ends.

    Under DDP every process holds the same weights (DDP averages the gradients); only global rank 0 writes, and the
    others wait for it, so the folder is complete on every rank (and node sharing the file system) when fit returns.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            target = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / ADAPTER_DIR
            datamodule = getattr(trainer, "datamodule", None)
            prompt = datamodule.prompt_description() if hasattr(datamodule, "prompt_description") else None
            write_adapter(pl_module, target, prompt)
            print(f"LoRA adapter written to {target.resolve()}")
        # If rank 0 fails above it exits, and the others' barrier fails with it instead of hanging.
        trainer.strategy.barrier("ExportAdapter")
