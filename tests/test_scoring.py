"""LabelScorer in every mode (padded, prefix cache, prefix trees with tree attention) equals a plain forward."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from lightning_modules.scoring import LabelScorer, PrefixCache, PrefixTree, _tree_batches, supports_prefix_sharing

PREFIX = [2, 7, 8, 9, 10, 11]
LABELS = [30, 31, 32]


def shared_continuations(seed: int = 0, n: int = 40) -> list[list[int]]:
    """Masked-variant-like continuations: random cuts of one base sequence plus a short random tail, with every
    case the tree must handle: duplicates, one continuation a prefix of another, one token, no shared token."""
    rng = random.Random(seed)
    base = [rng.randrange(4, 40) for _ in range(18)]
    continuations = []
    for _ in range(n):
        cut = rng.randrange(0, len(base))
        continuations.append(base[:cut] + [rng.randrange(4, 40) for _ in range(rng.randrange(1, 5))])
    continuations += [continuations[3], continuations[3], base[:5], base[:9], [base[0]], [39, 38, 37]]
    return continuations


@torch.no_grad()
def one_by_one(model, continuations, prefix=PREFIX) -> np.ndarray:
    """The reference: a plain `model(...).logits` forward of every whole prompt alone."""
    return np.stack(
        [
            torch.softmax(model(torch.tensor([list(prefix) + list(c)])).logits[0, -1, LABELS].double(), -1).numpy()
            for c in continuations
        ]
    )


def scorer(model, prefix=PREFIX, **options) -> LabelScorer:
    return LabelScorer(model, prefix, LABELS, **options)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param).eval()


def test_prefix_tree_has_one_node_per_distinct_prefix():
    sequences = [[1, 2, 3], [1, 2], [1, 2, 3], [1, 4], [5], [1, 2, 3, 6]]
    tree = PrefixTree.build(sequences)
    distinct = {tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)}
    assert len(tree.prefixes) == len(distinct) == 6 and set(tree.prefixes) == distinct
    for sequence, end in zip(sequences, tree.ends):
        # the end node's ancestors, root first, are the sequence's prefixes
        path = np.flatnonzero(tree.visible[end])
        assert [tree.prefixes[k] for k in path] == [tuple(sequence[: k + 1]) for k in range(len(sequence))]
    assert tree.ends[0] == tree.ends[2]  # duplicates share their node
    assert tree.visible[tree.ends[5], tree.ends[0]]  # [1, 2, 3] is a prefix of [1, 2, 3, 6]
    assert not tree.visible[tree.ends[3], tree.ends[1]] and tree.visible[tree.ends[3]].sum() == 2


def test_tree_batches_hold_what_a_padded_batch_holds():
    sequences = shared_continuations(seed=3, n=60)
    batches = _tree_batches(sequences, batch_size=4)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sequences)))
    budget = 4 * max(len(s) for s in sequences)
    for batch in batches:
        assert len(PrefixTree.build([sequences[i] for i in batch]).prefixes) <= budget
    assert len(batches) < len(sequences) / 4  # shared prefixes let a tree take more prompts than a padded batch
    assert _tree_batches([], batch_size=4) == []


def test_supports_prefix_sharing(tiny_model):
    assert supports_prefix_sharing(tiny_model)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
@pytest.mark.parametrize("mode", ["padded", "prefix_cache", "prefix_tree"])
def test_every_mode_equals_a_plain_forward_of_each_prompt(tiny_model, batch_size, mode):
    continuations = shared_continuations()
    expected = one_by_one(tiny_model, continuations)
    assert expected.std(0).max() > 1e-3  # outputs differ between prompts, so a wrong order could not pass
    got = scorer(tiny_model, mode=mode, batch_size=batch_size)(continuations)
    assert np.abs(got.probabilities - expected).max() <= 1e-5
    with torch.no_grad():
        last = torch.stack([tiny_model(torch.tensor([PREFIX + c])).logits[0, -1] for c in continuations])
    mass = torch.softmax(last.double(), -1)[:, LABELS].sum(-1).numpy()
    assert np.abs(got.label_space_mass - mass).max() <= 1e-5
    assert (got.top_token_is_label == np.isin(last.argmax(-1).numpy(), LABELS)).all()


@pytest.mark.parametrize(
    "continuations", [[[12]], [[12, 13, 14]], [[12, 13], [12, 13]], [[12], [12, 13], [12, 13, 14]]]
)
def test_shared_prefixes_edge_cases(tiny_model, continuations):
    got = scorer(tiny_model, mode="prefix_tree", batch_size=2)(continuations)
    assert np.abs(got.probabilities - one_by_one(tiny_model, continuations)).max() <= 1e-5


def test_remembered_prefixes_carry_over_between_calls(tiny_model):
    """The explainer's rounds: later calls reuse the prefixes earlier calls computed, with identical results."""
    continuations = shared_continuations(seed=4, n=45)
    expected = one_by_one(tiny_model, continuations)
    distinct = {tuple(c[:k]) for c in continuations for k in range(1, len(c) + 1)}
    positions = []  # decoder positions computed, from the embedding layer's output shapes
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda m, i, out: positions.append(out.shape[1]))

    def score_in_rounds(cache, rounds):
        tree = scorer(tiny_model, mode="prefix_tree", batch_size=4)
        tree.prefix_cache = cache  # the cache under test, with its own capacity
        for rows in rounds:
            got = tree(continuations[rows])
            assert np.abs(got.probabilities - expected[rows]).max() <= 1e-5

    try:
        rounds = [slice(start, start + 15) for start in range(0, len(continuations), 15)]
        cache = PrefixCache(tiny_model, PREFIX, torch.device("cpu"), max_remembered=4096)
        positions.clear()
        score_in_rounds(cache, rounds)
        assert sum(positions) == len(cache.slots) == len(distinct)  # every prefix computed once, across calls
        positions.clear()
        score_in_rounds(cache, rounds[::-1])  # all remembered: no forward at all
        assert sum(positions) == 0
        small = PrefixCache(tiny_model, PREFIX, torch.device("cpu"), max_remembered=25)  # forgets every few batches
        score_in_rounds(small, rounds + rounds)
        assert 0 < len(small.slots) <= 25
        small.forget()
        assert not small.slots
        default = PrefixCache(tiny_model, PREFIX, torch.device("cpu"))
        score_in_rounds(default, rounds)
        assert not default.slots  # remembers nothing by default
        with default.remembering() as remembering:
            score_in_rounds(remembering, rounds)
            assert len(default.slots) == len(distinct)
        assert not default.slots and default.max_remembered == 0
    finally:
        hook.remove()
    assert len(distinct) < sum(len(c) for c in continuations)


def test_a_full_cache_drops_the_least_recently_used_prefixes(tiny_model):
    """Three 3-token continuations with no shared token and room for 6 prefixes: reusing `a` makes `b` the least
    recently used, so remembering `c` drops `b` and keeps `a`. Positions computed, counted by hand, and every score
    equals a plain forward (`c`'s states were written into `b`'s old slots)."""
    a, b, c = [4, 5, 6], [7, 8, 9], [12, 13, 14]
    positions = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda m, i, out: positions.append(out.shape[1]))
    tree = scorer(tiny_model, mode="prefix_tree", batch_size=4)
    tree.prefix_cache = PrefixCache(tiny_model, PREFIX, torch.device("cpu"), max_remembered=6)
    computed = []
    try:
        for continuations in ([a], [b], [a], [c], [a], [c + [15]], [b], [a + [16, 17, 18, 19, 20, 21, 22]]):
            positions.clear()
            got = tree(continuations)
            computed.append(sum(positions))
            assert np.abs(got.probabilities - one_by_one(tiny_model, continuations)).max() <= 1e-5
    finally:
        hook.remove()
    # a, b new; a reused; c drops b; a still there; c's child on c's states, dropping a's first token; b again,
    # dropping a's other two and c's first; then 10 new prefixes under a, more than fit: the deepest 6 are kept
    assert computed == [3, 3, 0, 3, 0, 1, 3, 10]
    longest = a + [16, 17, 18, 19, 20, 21, 22]
    assert set(tree.prefix_cache.slots) == {tuple(longest[:k]) for k in range(5, 11)}
    assert sorted(tree.prefix_cache.slots.values()) == list(range(6))


def test_shared_prefixes_without_instruction(tiny_model):
    continuations = shared_continuations(seed=1, n=12)
    got = scorer(tiny_model, prefix=[], mode="prefix_tree", batch_size=5)(continuations)
    assert np.abs(got.probabilities - one_by_one(tiny_model, continuations, prefix=[])).max() <= 1e-5


def test_shared_prefixes_through_a_lora_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    assert supports_prefix_sharing(model)  # the tree path runs, not the padded fallback
    continuations = shared_continuations(seed=2, n=20)
    for context in (model.disable_adapter, contextlib.nullcontext):
        got = scorer(model, mode="prefix_tree", batch_size=8, state=context)(continuations)
        with context():
            assert np.abs(got.probabilities - one_by_one(model, continuations)).max() <= 1e-5


@pytest.mark.slow
def test_shared_prefixes_on_the_embedded_model_shap_variants(embedded_model_dir):
    """The masked variants the explainer asks for, on SmolLM2: the tree matches plain forwards (probabilities within
    1e-5, the label-space mass within 1e-4 relative)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from analysis.explanation.shap_values import mask_tweet, normalize_tweet, tweet_masker
    from datamodules.prompts import PromptEncoder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir).eval()
    encoder = PromptEncoder(tokenizer, ["negative", "neutral", "positive"])
    text = normalize_tweet("@united the flight was delayed again but the crew were lovely, thanks for the upgrade!")
    masker = tweet_masker(encoder)
    n_tokens = len(masker.data_transform(text)[0])
    rng = np.random.default_rng(0)
    # coalitions like the Partition explainer's: contiguous runs kept, so variants share leading tokens
    keeps = [np.arange(n_tokens) < cut for cut in rng.integers(0, n_tokens + 1, 24)]
    keeps += [rng.random(n_tokens) < 0.7 for _ in range(16)] + [np.ones(n_tokens, bool), np.zeros(n_tokens, bool)]
    continuations = [encoder.continuation(mask_tweet(masker, text, keep)) for keep in keeps]
    labels = encoder.label_token_ids
    shared = LabelScorer(model, encoder.prefix_ids, labels, mode="prefix_tree", batch_size=16)(continuations)
    with torch.no_grad():
        last = torch.stack([model(torch.tensor([encoder.prefix_ids + c])).logits[0, -1] for c in continuations])
    assert np.abs(shared.probabilities - torch.softmax(last[:, labels].double(), -1).numpy()).max() <= 1e-5
    mass = torch.softmax(last.double(), -1)[:, labels].sum(-1).numpy()
    # The mass is exp(logsumexp(label logits) - logsumexp(all 49,152 logits)): its relative error is about twice the
    # fp32 logit error after 30 layers summed in another order (tree vs plain forward), so it is bounded relatively.
    # Measured: up to 3.4e-5 on an AMD EPYC without AVX-512 (2026-12-03), under 2e-5 on AVX-512 hosts.
    np.testing.assert_allclose(shared.label_space_mass, mass, rtol=1e-4, atol=0)
    assert len(PrefixTree.build(continuations[:16]).prefixes) < sum(len(c) for c in continuations[:16])


def masked_softmax_attention(query, key, value, allowed, scale):
    """Reference attention written out: each query head reads key head h // groups; masked scores are dropped."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)).double() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ value.double()).transpose(1, 2)  # (1, rows, heads, dim)


@pytest.mark.parametrize("block_rows", [1, 4, 7, 64])
def test_tree_attention_blocks_equal_dense_attention(block_rows):
    """Each block of query rows reads only the keys some row of it may see: the same numbers as full attention."""
    from lightning_modules.tree_attention import TreeAttentionPlan, tree_attention_forward

    torch.manual_seed(0)
    tree = PrefixTree.build(shared_continuations(seed=5, n=30))
    rows, cached, known = len(tree.prefixes), 6, 9
    generator = torch.Generator().manual_seed(1)
    allowed = torch.cat(
        [
            torch.ones(rows, cached, dtype=torch.bool),
            torch.rand(rows, known, generator=generator) < 0.2,  # remembered ancestors, seen by some rows only
            torch.from_numpy(tree.visible),
        ],
        dim=1,
    )
    heads, kv_heads, dim = 6, 2, 8
    query = torch.randn(1, heads, rows, dim)
    key, value = torch.randn(1, kv_heads, allowed.shape[1], dim), torch.randn(1, kv_heads, allowed.shape[1], dim)
    plan = TreeAttentionPlan.build(allowed, block_rows=block_rows)
    real_rows = plan.mask[:, 0].reshape(-1, plan.mask.shape[-1])[:rows]  # padding rows come after the real ones
    assert plan.mask.shape[-1] <= allowed.shape[1] and real_rows.sum() == allowed.sum()  # same mask, fewer columns
    got, _ = tree_attention_forward(None, query, key, value, None, scaling=0.3, tree_plan=plan)
    expected = masked_softmax_attention(query, key, value, allowed[None, None], 0.3)
    assert got.shape == (1, rows, heads, dim)
    assert (got.double() - expected).abs().max() <= 1e-5
    if block_rows == 7:  # blocks of depth-first nodes share ancestors: far fewer scores than the dense rows x keys
        assert plan.mask.numel() < 0.5 * allowed.numel()


def test_tree_attention_is_switched_on_for_one_forward_only(tiny_model):
    from lightning_modules.tree_attention import TREE_ATTENTION, tree_attention

    config = tiny_model.config
    before = config._attn_implementation
    with pytest.raises(RuntimeError), tree_attention(config):
        assert config._attn_implementation == TREE_ATTENTION
        raise RuntimeError("a failing forward")
    assert config._attn_implementation == before


def test_label_only_head_gives_the_same_probabilities(tiny_model):
    """head="labels" (the SHAP value function) computes only the label rows of the lm_head."""
    continuations = shared_continuations(seed=6, n=20)
    expected = one_by_one(tiny_model, continuations)
    for mode in ("prefix_cache", "prefix_tree"):
        labels_only = scorer(tiny_model, mode=mode, head="labels", batch_size=6)(continuations)
        assert np.abs(labels_only.probabilities - expected).max() <= 1e-5
        assert labels_only.label_space_mass is None and labels_only.top_token_is_label is None


def test_a_cache_reused_for_another_job_gives_the_bytes_of_a_fresh_one(tiny_model):
    """Forgetting keeps the buffers for the next job (no memory faulted in again), never their old contents."""
    first, second = shared_continuations(seed=7, n=30), shared_continuations(seed=8, n=30)

    def job(cache, continuations):
        tree = scorer(tiny_model, mode="prefix_tree", head="labels", batch_size=4)
        tree.prefix_cache = cache
        with tree.remembering():
            return np.concatenate(
                [tree(continuations[k : k + 10]).probabilities for k in range(0, len(continuations), 10)]
            )

    used = PrefixCache(tiny_model, PREFIX, torch.device("cpu"))
    job(used, first)
    buffer = used._states[0][0]
    again = job(used, second)
    assert used._states[0][0].data_ptr() == buffer.data_ptr()  # the same memory, overwritten
    fresh = job(PrefixCache(tiny_model, PREFIX, torch.device("cpu")), second)
    assert np.array_equal(again, fresh)
