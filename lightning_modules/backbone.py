"""Loading a causal LM backbone and its tokenizer from the hub, a local folder or the embedded alias."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from foundation.errors import UserInputError
from foundation.hub import hub_error, resolve_model_source, resolve_token
from lightning_modules.lean_backward import keep_half_precision_for_backward
from lightning_modules.precision import choose_dtype
from lightning_modules.tree_attention import use_half_sdpa


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


# oneDNN (torch's CPU kernels for bf16/fp16 matrix products) keeps a compiled kernel per distinct shape, 1,024 of
# them by default; a fit's batches come in dozens of lengths, each with its own shapes, so the cache grew through
# the whole fit (a bf16 fit of 400 embedded tweets: peak 1.70 GiB, 1.57 GiB with 16, in the same time: a step's
# shapes are reused across its 30 layers, rarely across steps; docs/benchmarks.md). Read by oneDNN once, when it
# builds its first kernel; a value the user set is kept.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "16"


def bound_onednn_cache() -> None:
    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str = "auto", model_name: str = "") -> torch.dtype:
    """A dtype name as torch's; `auto` as `lightning_modules.precision` decides for evaluation (the commands resolve
    `auto` for their own phase before the model is built)."""
    if name == "auto":
        name = choose_dtype("auto", model_name, "evaluation").dtype
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
    dtype = resolve_dtype(dtype, model_name)
    if dtype != torch.float32:
        bound_onednn_cache()
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
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as error:  # a truncated or damaged weights file (an interrupted download or copy)
        raise UserInputError(
            f"The weights of '{model_name}' are damaged ({str(error).splitlines()[0]}); download or copy the model "
            "again."
        ) from error
    except (OSError, ValueError) as error:
        raise hub_error(model_name, error) from error
    if dtype != torch.float32:
        use_half_sdpa(model)  # a CPU computes half-precision attention faster in fp32; the fp32 path is untouched
    return model


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
    model = get_peft_model(model, config)
    if not gradient_checkpointing:  # checkpointed layers keep only their inputs already
        keep_half_precision_for_backward(model)
    return model


class AdapterSwitch:
    """Turns a peft model's adapters off and on again: what `PeftModel.disable_adapter()` does for LoRA, made cheap.

    Our own because peft's context manager walks every module of the model three times per use (a status check,
    then the disable and the enable walks): 31 ms per use on SmolLM2-135M, 2 cores, paid on each value-function call
    that reads the zero-shot model (shap's Partition explainer makes 18 per tweet: 7 % of its time over the
    prefix-cached value function). The adapter layers never change after `attach_lora`, so they are found once here
    and each gets the same `enable_adapters` call peft's walks make (which also sets the adapter weights'
    `requires_grad` back, as peft does). peft's status check only warns when some layers are on and others off;
    this switch is the only thing that turns them, always all together.
    """

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        was_disabled = self.model._adapters_disabled
        for layer in self.layers:
            layer.enable_adapters(False)
        self.model._adapters_disabled = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            self.model._adapters_disabled = was_disabled
