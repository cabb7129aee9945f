"""Block-sparse attention for a prefix tree run as one sequence (see `lightning_modules.scoring.tree_logits`).

A prefix tree of N new nodes attends over the instruction, the remembered nodes and the new nodes: a dense
(N, keys) score matrix of which each row needs only the instruction and the node's own ancestors, about a tenth of
it for SHAP's masked tweets. Here the rows are cut into blocks of consecutive nodes (the tree's nodes come in
depth-first order, so a block's nodes share most of their ancestors) and each block attends only over the key
columns some row of it may see: one batched `scaled_dot_product_attention` call over the blocks, with each block's
own slice of the mask. A column no row of a block sees is masked for every row of it, so leaving it out changes
nothing but float rounding.

transformers reaches the function through `config._attn_implementation`, which `tree_attention(config)` switches
to it for the duration of one forward; the block plan travels as the `tree_plan` keyword every decoder layer
forwards to its attention function.

Also here: `HALF_SDPA`, transformers' sdpa attention with bf16/fp16 inputs computed in fp32 on a CPU. torch's CPU
flash-attention kernels are slower in bf16 than in fp32 (measured with torch 2.13 on AMD EPYC, 4 x 9 heads x 87
tokens: forward 1.27 vs 1.02 ms, forward + backward 6.9 vs 3.7 ms; about a fifth of a bf16 fit step), while the
upcast of q, k and v costs a copy of a few small tensors. On a GPU the function is plain sdpa.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_modules.lean_backward import exact_copy, half_on_cpu, recorded, saved_as, upcast, upcast_repeated

TREE_ATTENTION = "lora_explain_prefix_tree"
HALF_SDPA = "lora_explain_sdpa"  # sdpa, with half-precision inputs upcast to fp32 on a CPU
BLOCK_ROWS = 32  # query rows per block: smaller blocks read fewer masked keys but make more, smaller products


@dataclass
class TreeAttentionPlan:
    """Which key columns each block of query rows reads, and the mask within them."""

    rows: int  # real query rows (the tree's new nodes)
    block_rows: int
    columns: torch.Tensor  # (blocks * width,) the key columns of each block, padded with column 0
    mask: torch.Tensor  # (blocks, 1, block_rows, width) bool: True = attend

    @classmethod
    def build(cls, allowed: torch.Tensor, block_rows: int = BLOCK_ROWS) -> TreeAttentionPlan:
        """From the (rows, keys) bool matrix of what each new node may attend to (every row allows some key)."""
        rows, keys = allowed.shape
        blocks = -(-rows // block_rows)
        padded = allowed.new_zeros((blocks * block_rows, keys))
        padded[:rows] = allowed
        padded[rows:, 0] = True  # padding rows read one key, so their softmax is defined; their output is dropped
        grouped = padded.view(blocks, block_rows, keys)
        used = grouped.any(dim=1)  # (blocks, keys)
        width = int(used.sum(dim=1).max())
        # Per block its used columns in key order, then unused ones (masked out, their index clamped to column 0).
        order = torch.argsort((~used).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = used.gather(1, order)
        mask = grouped.gather(2, order[:, None, :].expand(blocks, block_rows, width)) & valid[:, None, :]
        columns = torch.where(valid, order, torch.zeros_like(order))
        return cls(rows=rows, block_rows=block_rows, columns=columns.reshape(-1), mask=mask[:, None])


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    tree_plan: TreeAttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (1, heads, rows, dim), key/value (1, kv heads, keys, dim);
    returns (1, rows, heads, dim). Inference only (no dropout, no attention weights)."""
    if tree_plan is None:
        raise ValueError(f"the {TREE_ATTENTION!r} attention needs a tree_plan (see scoring.tree_logits)")
    plan = tree_plan
    dtype = query.dtype
    _, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    blocks, width = plan.mask.shape[0], plan.mask.shape[-1]
    query, key, value = _fp32_on_cpu(query, key, value)
    q = F.pad(query[0], (0, 0, 0, blocks * plan.block_rows - rows))
    q = q.view(heads, blocks, plan.block_rows, dim).transpose(0, 1)
    k = key[0].index_select(1, plan.columns).view(kv_heads, blocks, width, dim).transpose(0, 1)
    v = value[0].index_select(1, plan.columns).view(kv_heads, blocks, width, dim).transpose(0, 1)
    # grouped-query attention: query head h reads key head h // (heads // kv_heads), without copying the keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scaling, enable_gqa=heads != kv_heads)
    out = out.permute(0, 2, 1, 3).reshape(1, blocks * plan.block_rows, heads, dim)[:, :rows]
    return out.to(dtype), None


def _fp32_on_cpu(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bf16/fp16 tensors on a CPU as fp32 (see the module docstring); anything else as it is."""
    if not half_on_cpu(tensors[0]):
        return tensors
    return tuple(t.float() for t in tensors)


def half_sdpa_forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention; bf16/fp16 on a CPU computed in fp32 and returned in the input dtype. In a fit,
    autograd keeps the half-precision q, k and v in place of their fp32 copies (`lightning_modules.lean_backward`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        # an additive mask, in the dtype sdpa computes in
        attention_mask = attention_mask.to(torch.float32 if half_on_cpu(query) else dtype)
    if not (half_on_cpu(query) and recorded(query, key, value)):
        out, weights = sdpa_attention_forward(module, *_fp32_on_cpu(query, key, value), attention_mask, **kwargs)
        return out.to(dtype), weights
    # k and v repeated per query head here (as sdpa_attention_forward would), so that the fp32 tensors the kernel
    # keeps are the copies made here, which autograd keeps as their half-precision originals
    groups = getattr(module, "num_key_value_groups", 1)
    query, query_entry = exact_copy(query, upcast)
    key, key_entry = exact_copy(key, functools.partial(upcast_repeated, groups))
    value, value_entry = exact_copy(value, functools.partial(upcast_repeated, groups))
    entries = {t.data_ptr(): entry for t, entry in ((query, query_entry), (key, key_entry), (value, value_entry))}
    with saved_as(entries):
        out, weights = sdpa_attention_forward(_HeadsRepeated(module), query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


class _HeadsRepeated:
    """An attention module as `sdpa_attention_forward` reads it once its keys and values are repeated per query head:
    one key/value group, every other attribute the module's own."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
    AttentionInterface.register(HALF_SDPA, half_sdpa_forward)
    AttentionMaskInterface.register(HALF_SDPA, sdpa_mask)


def use_half_sdpa(model) -> None:
    """Route a model that uses sdpa through `half_sdpa_forward` (the same attention; fp32 on a CPU in half
    precision). Models on another attention implementation keep it."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == "sdpa":
        _register()
        config._attn_implementation = HALF_SDPA


@contextlib.contextmanager
def tree_attention(config) -> Iterator[None]:
    """Route the model's attention through `tree_attention_forward` inside the block (one tree forward)."""
    _register()
    previous = config._attn_implementation
    config._attn_implementation = TREE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
