"""What a fit on a CPU keeps for its backward pass: the smaller tensor where the forward pass made an exact, larger
copy of it.

A bf16 base computes a few steps in fp32 (the CPU attention for speed, peft's LoRA branch in the fp32 adapter
weights), and autograd keeps what those steps saved until the backward pass. Here three of them keep less, at no
cost in matrix products:

- attention (`tree_attention.half_sdpa_forward`, half precision): the fp32 kernel keeps fp32 q, k and v, with k and
  v repeated for every query head; here autograd keeps the bf16 q, k and v and rebuilds the fp32, repeated tensors
  when the backward pass reads them (an upcast and a repeat are exact);
- gated MLP (half precision): keeps the gate and up projections and computes `act_fn(gate)` again in the backward
  pass (one elementwise function) instead of keeping it as well;
- LoRA dropout (any dtype): keeps its mask as booleans instead of the fp32 noise tensor `input * noise` multiplies
  by (the same draws; the noise is the mask divided by 1 - p).

The forward values are the plain path's bit for bit, and so are the gradients (tests/test_lean_backward.py). Only work
on a CPU while autograd records takes these paths. Where autograd does not record (evaluation, explanations), the
gated MLP writes `act_fn(gate) * up` over its own gate projection instead: the same values, one large tensor fewer.
What it saves, and what else a CPU fit and a whole run hold, is in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

HALF = (torch.bfloat16, torch.float16)


def half_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in HALF


def recorded(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors (a fit step, not an evaluation)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@contextlib.contextmanager
def saved_as(copies: dict[int, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]) -> Iterator[None]:
    """Inside the block, a tensor autograd saves whose storage is a key of `copies` (`data_ptr()`) is kept as the
    smaller tensor `copies[key][0]` and rebuilt with `copies[key][1]` when the backward pass reads it; every other
    saved tensor is kept as it is. For exact copies only (an upcast, a repeat): the rebuilt tensor equals the saved
    one."""

    def pack(tensor: torch.Tensor):
        found = copies.get(tensor.data_ptr())
        if found is not None and found[2] == (tensor.dtype, tensor.shape, tensor.stride()):
            return found, None
        return None, tensor

    def unpack(packed) -> torch.Tensor:
        found, tensor = packed
        return tensor if found is None else found[1](found[0])

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def exact_copy(small: torch.Tensor, rebuild: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    """`rebuild(small)` computed once now, and the entry of `saved_as` that keeps `small` in its place (a saved tensor
    is matched by its storage, dtype, shape and strides, so a view of it is kept as it is)."""
    big = rebuild(small)  # with the gradient's way back to `small`
    return big, (small.detach(), rebuild, (big.dtype, big.shape, big.stride()))


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def upcast_repeated(groups: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' `repeat_kv` of the fp32 copy: key/value head h serves query heads h * groups ... + groups - 1."""
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv(x.float(), groups)


class _BooleanMaskDropout(torch.autograd.Function):
    """`input * noise` with `noise = empty_like(input).bernoulli_(1 - p).div_(1 - p)`, as torch's CPU dropout computes
    it (the same draws from the same generator), keeping the mask as booleans for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(noise != 0)
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        noise = kept.to(grad.dtype).div_(1 - ctx.p)  # the forward's noise, value for value
        return grad * noise, None


class BooleanMaskDropout(torch.nn.Dropout):
    """`nn.Dropout` that keeps its mask as booleans while training on a CPU (see `_BooleanMaskDropout`); elsewhere, and
    in eval mode, `nn.Dropout` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and x.device.type == "cpu" and recorded(x) and not self.inplace:
            return _BooleanMaskDropout.apply(x, self.p)
        return super().forward(x)


def _swiglu(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


def in_place_activation(act_fn) -> Callable[[torch.Tensor], torch.Tensor]:
    """`act_fn` as a function that may write over its input: torch's in-place SiLU for a SiLU, else `act_fn` itself
    (its output is then a new tensor, which the caller's `mul_` reuses). Resolved once per MLP, not per call."""
    from transformers.activations import SiLUActivation

    if isinstance(act_fn, (torch.nn.SiLU, SiLUActivation)):
        return functools.partial(torch.nn.functional.silu, inplace=True)
    return act_fn


def _gated_mlp_forward(mlp, activate_in_place, x: torch.Tensor) -> torch.Tensor:
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, transformers' gated MLP (Llama, Mistral, Qwen, SmolLM);
    `activate_in_place` is `in_place_activation(mlp.act_fn)`."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if not recorded(gate, up) and gate.dtype == up.dtype:
        # inference (evaluation, explanations): the activation and the product in gate's own storage, so no
        # (rows, intermediate) tensor is allocated and filled twice; about 3 % of a cached explanation on a CPU
        # (docs/benchmarks.md). gate is this call's own projection output, so nothing else sees it change. (Were
        # the dtypes to differ, the out-of-place product would promote and an in-place one would not.)
        return mlp.down_proj(activate_in_place(gate).mul_(up))
    swiglu = functools.partial(_swiglu, mlp.act_fn)
    if half_on_cpu(gate):
        # keeps gate and up (which it needs anyway), computes act_fn(gate) again in the backward pass
        return mlp.down_proj(checkpoint(swiglu, gate, up, use_reentrant=False, preserve_rng_state=False))
    return mlp.down_proj(swiglu(gate, up))


def keep_half_precision_for_backward(model) -> None:
    """Give the gated MLPs and LoRA dropouts of `model` (a peft-wrapped causal LM) the lean backward of the module
    docstring (attention has it in `half_sdpa_forward`). Modules keep their weights and names; a gated MLP's forward
    and the class of a LoRA dropout change, and only half-precision work on a CPU while autograd records differs."""
    from peft.tuners.lora import LoraLayer

    for module in list(model.modules()):
        if all(hasattr(module, part) for part in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = functools.partial(_gated_mlp_forward, module, in_place_activation(module.act_fn))
        elif isinstance(module, LoraLayer):
            for adapter, dropout in list(module.lora_dropout.items()):
                if type(dropout) is torch.nn.Dropout:
                    module.lora_dropout[adapter] = BooleanMaskDropout(dropout.p, dropout.inplace)
                    module.lora_dropout[adapter].train(dropout.training)
