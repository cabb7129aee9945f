"""Loading a causal LM backbone and its tokenizer from the hub, a local folder or the embedded alias."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.embedded_model import EMBEDDED_MODEL, embedded_model_dir
from lightning_modules.errors import UserInputError

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")


def resolve_token(explicit: str | None = None) -> str | None:
    """The explicit token, else `HF_TOKEN`, else `HUGGINGFACE_TOKEN`. Never logged or saved."""
    if explicit:
        return explicit
    for name in TOKEN_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def resolve_model_source(model_name: str) -> str:
    """Map the embedded alias to its converted folder; pass hub names and local folders through."""
    if model_name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if model_name.startswith("embedded:"):
        raise UserInputError(f"Unknown embedded model '{model_name}'; the embedded model is '{EMBEDDED_MODEL}'.")
    return model_name


def _hub_error(model_name: str, error: Exception) -> UserInputError:
    text = str(error)
    if Path(model_name).expanduser().exists():
        return UserInputError(f"Could not load the model folder '{model_name}': {text.splitlines()[0]}")
    if "gated" in text.lower() or "401" in text or "403" in text:
        return UserInputError(
            f"The model '{model_name}' is gated: accept its licence on huggingface.co and pass a token with "
            "--model.huggingface_token, HF_TOKEN or HUGGINGFACE_TOKEN."
        )
    if "connect" in text.lower() or "offline" in text.lower() or "resolve" in text.lower():
        return UserInputError(
            f"Could not reach the Hugging Face hub to download '{model_name}'; check the network, or use a local "
            f"folder or the offline model '{EMBEDDED_MODEL}'."
        )
    return UserInputError(
        f"Unknown model '{model_name}': it is neither a local folder nor a hub model id; check the name "
        f"(e.g. meta-llama/Llama-3.2-1B) or use '{EMBEDDED_MODEL}'."
    )


def load_tokenizer(model_name: str, token: str | None = None):
    """The tokenizer for a model, with a pad token (pads are never attended: right padding, causal attention)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=resolve_token(token), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise _hub_error(model_name, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def bitsandbytes_cpu_ready() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def use_4bit(load_in_4bit: bool, force_4bit_on_cpu: bool) -> bool:
    """Whether to quantise: on CUDA when asked; on CPU only when explicitly forced (it is slow there)."""
    if not load_in_4bit:
        return False
    if torch.cuda.is_available():
        return True
    if force_4bit_on_cpu:
        if not bitsandbytes_cpu_ready():
            raise UserInputError(
                "4-bit loading was forced on CPU (--model.force_4bit_on_cpu true) but bitsandbytes cannot run "
                "here; install bitsandbytes>=0.45 or drop the flag."
            )
        return True
    rank_zero_warn("No CUDA device: loading the backbone in full precision instead of 4-bit NF4.")
    return False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str = "auto") -> torch.dtype:
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32 (a CPU without AMX/AVX512-BF16 emulates bf16 slowly)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserInputError(f"Unknown dtype '{name}'; use auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_causal_lm(
    model_name: str,
    quantize_4bit: bool,
    token: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
):
    """A `*ForCausalLM` from safetensors only, optionally NF4-quantised with bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = resolve_model_source(model_name)
    dtype = resolve_dtype(dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True, "token": resolve_token(token)}
    if revision:
        kwargs["revision"] = revision
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(model_name, error) from error


def _disable_bnb_cpu_inference_packing(model) -> None:
    """bitsandbytes (0.50) repacks NF4 weights for fast CPU inference on the first eval-mode forward and never
    unpacks them; training through a packed layer silently yields no gradients (no autograd kernel). Lightning's
    sanity check runs in eval mode before fit, so we keep the trainable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(
    model,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    quantized: bool,
    gradient_checkpointing: bool,
):
    """Wrap the backbone in a peft LoRA model; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        _disable_bnb_cpu_inference_packing(model)
    # Non-reentrant checkpointing: gradients reach the LoRA weights whether or not the inputs require grad.
    checkpoint_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    missing = [name for name in target_modules if not any(n.endswith(name) for n, _ in model.named_modules())]
    if missing:
        raise UserInputError(
            f"LoRA target modules {missing} do not exist in this backbone; set --model.lora_target_modules "
            "to module names it has (Llama: q_proj, k_proj, v_proj, o_proj)."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
