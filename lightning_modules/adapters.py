"""Loading a trained adapter (an exported `lora_adapter/` folder or a Lightning checkpoint) into the classifier."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from foundation.errors import UserInputError
from foundation.output_names import CLASSIFICATION_FILE

# What an adapter was trained with that must hold again when it is evaluated or explained.
PROMPT_KEYS = (
    ("prompt_style", "--data.prompt_style"),
    ("label_words", "--data.label_words"),
    ("label_token_ids", "--data.label_words"),
    ("num_demonstrations", "--data.num_demonstrations"),
    ("instruction", "--data.prompt_style, --data.num_demonstrations and --data.seed"),
)

MISSING_ADAPTER = "The adapter '{}' does not exist; pass a lora_adapter/ folder or a .ckpt file."


def existing_adapter(adapter: str | Path | None) -> Path | None:
    """The adapter's absolute path (None without one), checked to exist: callers fail before the slow model load."""
    if not adapter:
        return None
    path = Path(adapter).expanduser().resolve()
    if not path.exists():
        raise UserInputError(MISSING_ADAPTER.format(path))
    return path


def load_adapter(module, path: str | Path, prompt: dict | None = None) -> dict:
    """Replace `module`'s LoRA weights with the saved ones, after checking they belong to this base, these labels
    and (when `prompt` is given, see `PromptEncoder.describe`) this prompt: an adapter answers in the prompt and label
    words it was trained with, so evaluating it on others would measure noise.

    Returns what is known about the adapter (base model, label names, prompt) for the caller to record.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        meta, weights = _read_adapter_folder(path)
    elif path.is_file():
        meta, weights = _read_checkpoint(path)
    else:
        raise UserInputError(MISSING_ADAPTER.format(path))
    base = meta.get("base_model")
    if base and base != module.hparams.model_name:
        raise UserInputError(
            f"The adapter '{path}' was trained on '{base}' but the model is '{module.hparams.model_name}'; "
            "evaluate it with the same --model.model_name it was trained with."
        )
    labels = meta.get("label_names")
    if labels and list(labels) != list(module.label_names):
        raise UserInputError(
            f"The adapter '{path}' was trained on labels {labels} but the data has {module.label_names}; "
            "use the same dataset and --data.label_space as in training."
        )
    expected = module.trainable_state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise UserInputError(
            f"The adapter '{path}' does not fit this model (different base architecture or LoRA settings); "
            "use the config it was trained with."
        )
    for key, flag in PROMPT_KEYS if prompt else ():
        trained, current = meta.get(key), prompt.get(key)
        if trained is not None and current is not None and trained != current:
            raise UserInputError(
                f"The adapter '{path}' was trained with {key} {trained!r} but the config gives {current!r}; "
                f"set {flag} as in training."
            )
    module.load_state_dict(weights, strict=False)
    return meta


def _read_adapter_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights_file = path / "adapter_model.safetensors"
    config_file = path / "adapter_config.json"
    if not weights_file.is_file() or not config_file.is_file():
        raise UserInputError(
            f"'{path}' is not a LoRA adapter folder (adapter_config.json and adapter_model.safetensors)."
        )
    try:
        config = json.loads(config_file.read_text())
        raw = load_file(str(weights_file))
        meta = {"base_model": config.get("base_model_name_or_path")}
        if (path / CLASSIFICATION_FILE).is_file():
            meta.update(json.loads((path / CLASSIFICATION_FILE).read_text()))
    except Exception as error:  # truncated or corrupt files
        raise UserInputError(f"The adapter '{path}' is corrupt ({error}); export it again.") from error
    # peft stores keys without the adapter name: "base_model.model.<...>.lora_A.weight".
    weights = {}
    for key, value in raw.items():
        key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        weights[f"backbone.{key}"] = value
    return meta, weights


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        weights = checkpoint["state_dict"]
    except Exception as error:
        raise UserInputError(f"The checkpoint '{path}' is missing or corrupt ({error}); pass another one.") from error
    hparams = checkpoint.get("hyper_parameters", {})
    meta = {"base_model": hparams.get("model_name"), "label_names": checkpoint.get("label_names")}
    return meta, weights
