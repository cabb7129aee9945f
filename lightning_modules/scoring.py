"""The one place that turns prompts into label-token probabilities.

Training goes through `logits_at_positions`; evaluation, SHAP and faithfulness through a `LabelScorer` (one per model
and prompt), so every number the toolkit reports reads the same position of the same model.

A `LabelScorer` in `prefix_tree` mode merges continuations that start with the same tokens (SHAP's masked variants
of one tweet do) into a prefix tree and runs each tree as one sequence: every distinct prefix is computed once, and
no pad is computed at all. A tree-shaped attention mask lets each token see the instruction and its own ancestors
only, at the position it has in its own prompt, so each token's state is the one a separate forward of its prompt
computes (equal up to float rounding). The attention reads, per block of nodes, only the keys the block may see
(`lightning_modules.tree_attention`), so a large tree pays no attention over the pairs its mask rules out. Inside
`PrefixCache.remembering()` later calls also reuse the prefixes earlier calls computed (the explainer's rounds over
one tweet). It pays where prompts share prefixes (2.3-2.5x less CPU time per explained tweet,
bench/bench_shap_prefix_sharing.py); on unrelated prompts it saves only the pads, so evaluation uses `prefix_cache`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_modules.tree_attention import HALF_SDPA, TreeAttentionPlan, tree_attention


def _causal_lm(model):
    """The `*ForCausalLM` inside a peft wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwargs(decoder, cache) -> dict:
    """transformers 5.x renamed the decoder's `past_key_values` argument to `cache`; pass whichever it takes."""
    if cache is None:
        return {"use_cache": False}
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def logits_at_positions(
    model,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-vocabulary logits at one position per row, shape (batch, vocab), or only those of `token_ids`.

    Runs the decoder, gathers one hidden state per row and applies the lm_head there only: with a 128k vocabulary,
    logits at every position would cost gigabytes for nothing.
    """
    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **_cache_kwargs(decoder, past_key_values))
    hidden = outputs.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), positions]
    return _head_logits(causal_lm, hidden, token_ids)


def _head_logits(causal_lm, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    """The lm_head on `hidden`: every token's logit, or with `token_ids` only theirs, (rows, len(token_ids)).

    A plain linear head computes just those rows of its weight (a few dot products instead of the whole vocabulary);
    any other head (quantized, adapted) runs whole and is indexed.
    """
    head = causal_lm.get_output_embeddings()
    if token_ids is None:
        return head(hidden)
    if type(head) is torch.nn.Linear:
        bias = None if head.bias is None else head.bias.index_select(0, token_ids)
        return torch.nn.functional.linear(hidden, head.weight.index_select(0, token_ids), bias)
    return head(hidden).index_select(-1, token_ids)


def input_embeddings(model, input_ids: Sequence[int]) -> torch.Tensor:
    """The embedding rows of `input_ids`, (1, len, hidden): what a gradient explainer perturbs."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=_device_of(model))
    return _causal_lm(model).get_input_embeddings()(ids)


def label_logits_from_embeddings(
    model, continuation_embeddings: torch.Tensor, label_token_ids: Sequence[int], prefix_cache: PrefixCache | None
) -> torch.Tensor:
    """Label-token logits at the last position of `prefix + continuation` for a batch of continuation embeddings
    (batch, len, hidden), differentiable in them: the same decoder and head as every other path here, with the
    prefix's key/value states from `prefix_cache` (computed once, no gradient needed there)."""
    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder()
    past = prefix_cache.for_batch(continuation_embeddings.shape[0]) if prefix_cache else None
    outputs = decoder(inputs_embeds=continuation_embeddings, **_cache_kwargs(decoder, past))
    label_ids = torch.tensor(list(label_token_ids), dtype=torch.long, device=continuation_embeddings.device)
    return _head_logits(causal_lm, outputs.last_hidden_state[:, -1], label_ids)


def prefix_states(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A cache holding a fixed prefix's (keys, values) per layer for one scoring forward, which never grows it.

    transformers' `DynamicCache` copies the prefix into each layer when built (an expanded view becomes batch x
    prefix states) and keeps every layer's prefix + new states until the forward ends: for a k-shot prompt in batches
    of 16, hundreds of megabytes at once. Here the prefix stays as given (views of one copy), a layer's concatenation
    lives only while that layer attends, and the forward's own new states are kept per layer (`new_keys`,
    `new_values`) for a prefix tree to remember. Attention sees the same keys in the same order, so the scores are
    those of a `DynamicCache` bit for bit.
    """
    from transformers.cache_utils import Cache

    layer_class = _prefix_layer_class()
    return Cache(layers=[layer_class(k, v) for k, v in layers])


@functools.cache
def _prefix_layer_class():
    """`prefix_states`' layer (built on first use: transformers loads only when a model does)."""
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True
            self.new_keys = self.new_values = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            self.new_keys, self.new_values = key_states, value_states
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixLayer


@dataclass
class LabelScores:
    """Per-example scores at the label position; arrays in the order the prompts were given."""

    probabilities: np.ndarray  # (n, classes): softmax over the label tokens only
    # Both None when scored with `full_vocabulary=False`:
    label_space_mass: np.ndarray | None  # (n,): probability the unconstrained next token is a label token
    top_token_is_label: np.ndarray | None  # (n,) bool: the unconstrained arg-max is a label token


# Remembered tweet prefixes per model during one tweet's explanation. Each costs 2 x layers x kv width floats plus one
# hidden state (48 KB in fp32 for SmolLM2-135M). analyze.py on 3 embedded eval tweets, both models, max_evals 200
# (2026-12-03): 4096 -> peak 1.68 GiB, 83 s; 2048 -> 1.52 GiB, 85 s; 1024 -> 1.43 GiB, 92 s; none -> 1.34 GiB, 101 s.
# 2026-12-04, the same 3 tweets twice each: 2048 -> 1.52 GiB, 47.6 / 54.8 s explaining; 1536 -> 1.47 GiB, 50.2 /
# 50.8 s; 1024 -> 1.43 GiB, 48.7 / 57.5 s (docs/benchmarks.md). Past the bound the least recently used are dropped:
# bench_explainers.py's 2 tweets then compute 4,299 positions per Partition explanation against the fewest possible
# 4,152 (dropping them all at once, as before: 4,616).
REMEMBERED_PREFIXES = 1536


class PrefixCache:
    """Key/value states of the instruction prefix shared by every prompt, computed once per model state.

    Inside `with cache.remembering():` (or with `max_remembered > 0`), a `prefix_tree` `LabelScorer` also
    keeps here the continuation prefixes it computes (their key/value states and final hidden states), and later
    calls reuse them: the explainer asks for masked variants of the same tweet round after round (about 2,000-4,000
    distinct prefixes per tweet at max_evals 200). Past `max_remembered` it drops the least recently used (computed
    or reused) to make room: the explainer's next round refines the coalitions of its last ones.
    A reused state equals a recomputed one up to float rounding only, so scores then depend, in their last bits, on
    what ran before: scope the remembering to one independent job (one tweet's explanation) to keep runs
    bit-reproducible (a resumed or sharded run gives the same bytes).
    """

    def __init__(self, model, prefix_ids: Sequence[int], device: torch.device, max_remembered: int = 0):
        from transformers import DynamicCache

        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        cache = DynamicCache()
        decoder = _causal_lm(model).get_decoder()
        decoder(input_ids=ids, **_cache_kwargs(decoder, cache))
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = ids.shape[1]
        self.max_remembered = max_remembered
        self._states: list[list[torch.Tensor]] = []  # per layer [keys, values], (1, heads, capacity, dim)
        self._hidden: torch.Tensor | None = None  # (capacity, hidden size)
        self.forget()

    def for_batch(self, batch_size: int):
        """The instruction's states for a forward of `batch_size` rows: views, copied per row one layer at a time."""
        return prefix_states(
            [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.layers]
        )

    @contextlib.contextmanager
    def remembering(self, max_remembered: int = REMEMBERED_PREFIXES) -> Iterator[PrefixCache]:
        """Remember computed continuation prefixes inside the block only; forgotten on entry and on exit."""
        self.forget()
        previous, self.max_remembered = self.max_remembered, max_remembered
        try:
            yield self
        finally:
            self.max_remembered = previous
            self.forget()

    def forget(self) -> None:
        """Drop the remembered continuation prefixes (the instruction's states stay).

        The buffers stay allocated and are overwritten by the next job: faulting tens of fresh megabytes in again
        for every explained tweet costs more time than keeping them.
        """
        # continuation prefix -> its index in the buffers, least recently used first; the indices in use are always
        # 0 .. len - 1 (a slot is freed only to be written again at once)
        self.slots: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def lookup(self, prefixes: Sequence[tuple[int, ...]]) -> list[int]:
        """Each prefix's slot, -1 where it is not remembered; the remembered ones become the most recently used."""
        found = []
        for prefix in prefixes:
            slot = self.slots.get(prefix, -1)
            if slot >= 0:
                self.slots.move_to_end(prefix)
            found.append(slot)
        return found

    def recall(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the instruction's keys/values followed by those of the remembered prefixes at `slots`."""
        if not len(slots):
            return list(self.layers)
        return [
            (torch.cat([k, keys.index_select(2, slots)], 2), torch.cat([v, values.index_select(2, slots)], 2))
            for (k, v), (keys, values) in zip(self.layers, self._states)
        ]

    def hidden(self, slots: torch.Tensor) -> torch.Tensor:
        return self._hidden.index_select(0, slots)

    def remember(self, prefixes: Sequence[tuple[int, ...]], layers, hidden: torch.Tensor) -> None:
        """Keep the states of new `prefixes`: per layer (keys, values) of shape (1, heads, len(prefixes), dim), in
        the slots of the least recently used ones when full (of more than fit, the last `max_remembered`)."""
        capacity = self.max_remembered
        if not capacity:
            return
        skip = max(0, len(prefixes) - capacity)
        prefixes, hidden = prefixes[skip:], hidden[skip:]
        used = len(self.slots)
        dropped = max(0, used + len(prefixes) - capacity)
        freed = [self.slots.popitem(last=False)[1] for _ in range(dropped)]  # the least recently used slots
        targets = freed + list(range(used, used + len(prefixes) - dropped))
        index = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        if not self._states:
            self._states = [[None, None] for _ in layers]
        for state, (keys, values) in zip(self._states, layers):
            state[0] = _write_at(state[0], index, keys[:, :, skip:], dim=2, capacity=capacity)
            state[1] = _write_at(state[1], index, values[:, :, skip:], dim=2, capacity=capacity)
        self._hidden = _write_at(self._hidden, index, hidden, dim=0, capacity=capacity)
        self.slots.update(zip(prefixes, index.tolist()))


def _write_at(buffer: torch.Tensor | None, index: torch.Tensor, new: torch.Tensor, dim: int, capacity: int):
    """`buffer` with `new` written at `index` along `dim`. A buffer holds `capacity` entries from the start (pages a
    CPU never touches are never faulted in), so it is never copied while a job grows."""
    if buffer is None or buffer.shape[dim] < capacity:
        shape = list(new.shape)
        shape[dim] = capacity
        grown = new.new_empty(shape)
        if buffer is not None:
            grown.narrow(dim, 0, buffer.shape[dim]).copy_(buffer)
        buffer = grown
    return buffer.index_copy_(dim, index, new)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class PrefixTree:
    """Token sequences merged on shared leading tokens: one node per distinct prefix, parents before children."""

    prefixes: list[tuple[int, ...]]  # the node's prefix; its last token is the node's input
    visible: np.ndarray  # (nodes, nodes) bool: column k is an ancestor of row j, or j itself
    ends: list[int]  # per sequence, in the order given: the node of its last token

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]]) -> PrefixTree:
        """Walk the sequences in lexicographic order: each one adds a node for every token after its longest common
        prefix with the previous one, so the tree has exactly one node per distinct prefix."""
        prefixes: list[tuple[int, ...]] = []
        ancestry: list[list[int]] = []  # the path from the root to each node
        ends = [0] * len(sequences)
        path: list[int] = []  # nodes of the previous sequence, by depth
        previous: tuple[int, ...] = ()
        for i in sorted(range(len(sequences)), key=lambda i: list(sequences[i])):
            sequence = tuple(sequences[i])
            common = _common_length(previous, sequence)
            del path[common:]
            for depth in range(common, len(sequence)):
                prefixes.append(sequence[: depth + 1])
                path.append(len(prefixes) - 1)
                ancestry.append(list(path))
            ends[i] = path[len(sequence) - 1]
            previous = sequence
        visible = np.zeros((len(prefixes), len(prefixes)), dtype=bool)
        for node, nodes in enumerate(ancestry):
            visible[node, nodes] = True
        return cls(prefixes=prefixes, visible=visible, ends=ends)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common


def _tree_batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of lexicographically adjacent sequences, each batch a tree of at most as many nodes as a padded batch
    of `batch_size` rows of the longest sequence has positions (the same memory, usually far fewer forwards)."""
    budget = batch_size * max((len(s) for s in sequences), default=0)
    batches: list[list[int]] = []
    nodes, previous = 0, ()
    for i in sorted(range(len(sequences)), key=lambda i: list(sequences[i])):
        sequence = tuple(sequences[i])
        added = len(sequence) - _common_length(previous, sequence)
        if batches and nodes + added <= budget:
            batches[-1].append(i)
            nodes += added
        else:
            batches.append([i])
            nodes = len(sequence)
        previous = sequence
    return batches


def supports_prefix_sharing(model) -> bool:
    """Whether the tree path may run the model: its attention is plain softmax attention (sdpa or eager), which the
    tree's block-sparse attention (`lightning_modules.tree_attention`) computes exactly; other kernels may differ."""
    return getattr(_causal_lm(model).config, "_attn_implementation", None) in ("sdpa", "eager", HALF_SDPA)


def tree_logits(
    model, tree: PrefixTree, prefix_cache: PrefixCache | None = None, token_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-vocabulary logits at the end of every sequence of `tree`, shape (sequences, vocab), or only those of
    `token_ids`.

    The nodes `prefix_cache` does not remember run as one sequence on top of the instruction and the remembered
    nodes, each attending to the instruction and its own ancestors at its own position; then the cache remembers
    them (if it keeps any).
    """
    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder()
    device = _device_of(model)
    slots = prefix_cache.lookup(tree.prefixes) if prefix_cache else [-1] * len(tree.prefixes)
    known = [node for node, slot in enumerate(slots) if slot >= 0]
    new = [node for node, slot in enumerate(slots) if slot < 0]
    known_slots = torch.tensor([slots[node] for node in known], dtype=torch.long, device=device)
    hidden = [prefix_cache.hidden(known_slots)] if known else []
    if new:
        cached = prefix_cache.length if prefix_cache else 0
        visible = torch.from_numpy(tree.visible[new]).to(device)
        allowed = torch.cat([visible.new_ones((len(new), cached)), visible[:, known], visible[:, new]], dim=1)
        input_ids = torch.tensor([[tree.prefixes[node][-1] for node in new]], dtype=torch.long, device=device)
        embeddings = decoder.get_input_embeddings()(input_ids)
        positions = [[cached + len(tree.prefixes[node]) - 1 for node in new]]
        past = prefix_states(prefix_cache.recall(known_slots)) if prefix_cache else None
        with tree_attention(causal_lm.config):
            outputs = decoder(
                inputs_embeds=embeddings,
                attention_mask=allowed[None, None],  # what each node sees; the plan is the same mask in blocks
                position_ids=torch.tensor(positions, dtype=torch.long, device=device),
                tree_plan=TreeAttentionPlan.build(allowed),
                **_cache_kwargs(decoder, past),
            )
        hidden.append(outputs.last_hidden_state[0])
        if prefix_cache and prefix_cache.max_remembered:
            states = [(layer.new_keys, layer.new_values) for layer in past.layers]
            prefix_cache.remember([tree.prefixes[node] for node in new], states, hidden[-1])
    row = {node: k for k, node in enumerate(known + new)}  # the rows of torch.cat(hidden)
    ends = torch.tensor([row[node] for node in tree.ends], dtype=torch.long, device=device)
    return _head_logits(causal_lm, torch.cat(hidden).index_select(0, ends), token_ids)


SCORING_MODES = ("padded", "prefix_cache", "prefix_tree")
HEADS = ("full", "labels")


class LabelScorer:
    """Label-token probabilities of one model in one state, for prompts `prefix_ids + continuation`: built once per
    model (and prompt), then called on batches of continuations (each ends at the position that predicts the label).

    `mode`:
    - `padded`: whole prompts in length-sorted, right-padded batches (pads come after the read position, so causal
      attention never sees them): the plain forward, the reference.
    - `prefix_cache`: the prefix's key/value states computed once (on first use) and reused by every batch.
    - `prefix_tree`: on top of the prefix cache, lexicographically adjacent continuations merged into one `PrefixTree`
      of at most `batch_size` x the longest prompt's length nodes (what a padded batch holds), run as one sequence;
      inside `remembering()` later calls reuse the prefixes earlier ones computed (see `PrefixCache`). Models whose
      attention takes no custom mask fall back to `prefix_cache`.
    `head`: `full` applies the lm_head to the whole vocabulary (so `label_space_mass` and `top_token_is_label` are
    known); `labels` computes the label rows only (a value function needs nothing else) and leaves those None.
    `state` is entered around every forward, the prefix's included (e.g. `lambda: module.adapter(False)`), so a
    scorer always reads the model it was built for; without it the caller's state is used.
    """

    def __init__(
        self,
        model,
        prefix_ids: Sequence[int],
        label_token_ids: Sequence[int],
        mode: str = "prefix_cache",
        head: str = "full",
        batch_size: int = 16,
        pad_token_id: int = 0,
        state: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if mode not in SCORING_MODES or head not in HEADS:
            raise ValueError(f"mode must be one of {SCORING_MODES} and head one of {HEADS}, got {mode!r}, {head!r}")
        if mode == "prefix_tree" and not supports_prefix_sharing(model):
            mode = "prefix_cache"
        self.model = model
        self.prefix_ids = list(prefix_ids)
        self.label_token_ids = list(label_token_ids)
        self.mode, self.head = mode, head
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.state = state
        self.prefix_cache: PrefixCache | None = None

    @property
    def remembers(self) -> bool:
        """Whether calls inside `remembering()` reuse the prefixes earlier calls computed."""
        return self.mode == "prefix_tree" and bool(self.prefix_ids)

    def _cache(self) -> PrefixCache | None:
        if self.mode != "padded" and self.prefix_cache is None and self.prefix_ids:
            with self.state():
                self.prefix_cache = PrefixCache(self.model, self.prefix_ids, _device_of(self.model))
        return self.prefix_cache

    @contextlib.contextmanager
    def remembering(self) -> Iterator[None]:
        """Reuse computed continuation prefixes across calls inside the block (one job, e.g. one tweet's
        explanation); forgotten on entry and exit, so every job is computed the same way whatever ran before."""
        if not self.remembers:
            yield
            return
        with self._cache().remembering():
            yield

    @torch.no_grad()
    def __call__(self, continuations: Sequence[Sequence[int]]) -> LabelScores:
        if any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token (the label position)")
        prefix_cache = self._cache()
        with self.state():
            return self._score(continuations, prefix_cache)

    def _score(self, continuations: Sequence[Sequence[int]], prefix_cache: PrefixCache | None) -> LabelScores:
        model, batch_size = self.model, self.batch_size
        device = _device_of(model)
        label_ids = torch.tensor(self.label_token_ids, dtype=torch.long, device=device)
        full_vocabulary = self.head == "full"
        n = len(continuations)
        probabilities = np.zeros((n, len(label_ids)), dtype=np.float64)
        mass = np.zeros(n, dtype=np.float64) if full_vocabulary else None
        top_is_label = np.zeros(n, dtype=bool) if full_vocabulary else None
        head_ids = None if full_vocabulary else label_ids
        sequences = [list(c) if prefix_cache else self.prefix_ids + list(c) for c in continuations]
        share_prefixes = self.mode == "prefix_tree"
        if share_prefixes:
            batches = _tree_batches(sequences, batch_size)
        else:
            order = sorted(range(n), key=lambda i: len(sequences[i]))
            batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
        for rows in batches:
            if share_prefixes:
                logits = tree_logits(model, PrefixTree.build([sequences[i] for i in rows]), prefix_cache, head_ids)
            else:
                width = max(len(sequences[i]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=device)
                for row, i in enumerate(rows):
                    input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                positions = torch.tensor([len(sequences[i]) - 1 for i in rows], device=device)
                past = prefix_cache.for_batch(len(rows)) if prefix_cache else None
                logits = logits_at_positions(model, input_ids, positions, past_key_values=past, token_ids=head_ids)
            logits = logits.float()
            if not full_vocabulary:  # the columns are the label tokens
                probabilities[rows] = torch.softmax(logits, dim=-1).cpu().double().numpy()
                continue
            log_probs = torch.log_softmax(logits, dim=-1)
            label_logits = logits[:, label_ids]
            probabilities[rows] = torch.softmax(label_logits, dim=-1).cpu().double().numpy()
            mass[rows] = log_probs[:, label_ids].exp().sum(-1).cpu().double().numpy()
            top_is_label[rows] = torch.isin(logits.argmax(-1), label_ids).cpu().numpy()
        return LabelScores(probabilities=probabilities, label_space_mass=mass, top_token_is_label=top_is_label)
