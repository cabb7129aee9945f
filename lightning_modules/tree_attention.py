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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TREE_ATTENTION = "lora_explain_prefix_tree"
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
    _, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    blocks, width = plan.mask.shape[0], plan.mask.shape[-1]
    q = F.pad(query[0], (0, 0, 0, blocks * plan.block_rows - rows))
    q = q.view(heads, blocks, plan.block_rows, dim).transpose(0, 1)
    k = key[0].index_select(1, plan.columns).view(kv_heads, blocks, width, dim).transpose(0, 1)
    v = value[0].index_select(1, plan.columns).view(kv_heads, blocks, width, dim).transpose(0, 1)
    # grouped-query attention: query head h reads key head h // (heads // kv_heads), without copying the keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scaling, enable_gqa=heads != kv_heads)
    out = out.permute(0, 2, 1, 3).reshape(1, blocks * plan.block_rows, heads, dim)[:, :rows]
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)


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
