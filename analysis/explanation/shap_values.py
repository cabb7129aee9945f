"""SHAP over the tweet's own words or tokens: masker, value function, explainer, per-example records and their loader.

What is a feature. Only the tweet's words (default: whitespace-delimited units, see `WordSegmenter`) or its tokens
(`features="tokens"`: exactly as `PromptEncoder.tweet_ids` encodes them); the instruction and the `Label:` tail are
fixed context. shap's Text masker masks the tweet *string*; the value function puts every
masked tweet back into the prompt through `PromptEncoder.continuation` (the one prompt builder) and reads the
label-token probabilities through the model's `LabelScorer` (the one scorer), with the instruction's key/value cache
computed once per model state.

How a feature is masked. Its text is deleted (empty mask token), not replaced by a placeholder. A causal LM has no mask
token, and any placeholder ("...", "_", <unk>) is itself text the model reads: "..." signals hesitation or
sarcasm, which would leak into every attribution. Deletion keeps every model input a plain tweet; all-masked is the
empty tweet, so the base value is the model's prediction with no tweet evidence at all. The faithfulness curves
remove features the same way, so SHAP and AOPC answer the same question.

All explained models see identical masked inputs: one Partition explainer evaluates every model's value function
(e.g. zero-shot and fine-tuned, or any baseline of `analysis.models`) side by side on every coalition it
chooses (its outputs are the probability vectors concatenated), so a difference between the explanations is never
a difference in which coalitions were sampled. A k-shot baseline reads the same tweet after a longer prefix;
a calibrated baseline's value function is the calibrated probabilities.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import shap

from analysis.settings import FEATURES
from datamodules.prompts import PromptEncoder
from lightning_modules.scoring import LabelScorer

# Coalitions the explainer asks for per round; independent of the forward batch size, so changing
# --explain.forward_batch_size (e.g. for memory) never changes which coalitions a budget-limited run evaluates.
MASKS_PER_ROUND = 32
BUDGET_NOTE = (
    "shap's Partition explainer spends 2 evaluations on the full and the empty tweet and 2 per split of a group of "
    "adjacent features (words or tokens), splitting the groups with the largest effect first, each in two contexts. "
    "A group it has no budget left to split gives its credit to its features in equal shares: the values still add "
    "up to f(x) - base value, but the ranking inside the group is lost (`shared_credit_fraction` is that share of "
    "the credit). Below 2 x n_tokens - 1 evaluations (n_tokens: the number of features) some group is never split "
    "at all ('coarse'); exact Owen values need "
    "`evals_for_exact_owen` evaluations ('exact'); in between the values are 'approximate'."
)


# ---- features: the tweet's words or tokens -----------------------------------------------------------------------
WORD = re.compile(r"\S+")


def normalize_tweet(text: str) -> str:
    """Whitespace-normalised tweet (as the DataModule stores it), so an unmasked tweet rebuilds the same prompt."""
    return " ".join(str(text).split())


class TweetTokenizer:
    """The tweet's tokens as `PromptEncoder.tweet_ids` encodes them, with character offsets into the tweet.

    This is the minimal tokenizer interface shap's Text masker reads (`input_ids`, `offset_mapping`). Byte-level
    tokenizers split one character (an emoji) into several tokens with overlapping offsets; overlaps are cut so the
    segments tile the tweet exactly: the first token carries the character, the rest get empty segments (masking
    them changes nothing: their exact Owen value is 0).
    """

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder

    def __call__(self, text: str, return_offsets_mapping: bool = True, **_) -> dict:
        stripped = text.strip()
        if not stripped:  # shap probes "" for special tokens; a tweet without text has no features
            return {"input_ids": [], "offset_mapping": []}
        encoded = self.encoder.tokenizer(" " + stripped, add_special_tokens=False, return_offsets_mapping=True)
        lead = len(text) - len(text.lstrip()) - 1  # offsets are into " " + stripped
        offsets, end = [], lead + 1
        for start, stop in encoded["offset_mapping"]:
            start = max(start + lead, end)
            end = max(stop + lead, start)
            offsets.append((start, end))
        return {"input_ids": list(encoded["input_ids"]), "offset_mapping": offsets}


class WordSegmenter:
    """The tweet's words, with character offsets: the features of `features="words"`.

    A word is a maximal run of non-whitespace characters of the (whitespace-normalised) tweet: an @mention, a
    #hashtag, a URL, an emoji run, a word with the punctuation attached to it ("again!!", "(so", "can't"). Masking a
    word deletes all of its tokens together, so a word split into subword tokens ("un" + "ited") is one feature.
    Each segment carries the space after it, so the segments joined give the tweet back. Same interface as
    `TweetTokenizer`.
    """

    def __call__(self, text: str, return_offsets_mapping: bool = True, **_) -> dict:
        spans = [match.span() for match in WORD.finditer(text)]
        return {"input_ids": list(range(len(spans))), "offset_mapping": spans}


class TweetMasker(shap.maskers.Text):
    """shap's Text masker over the tweet's words or tokens, where a masked feature's text is deleted (see the module
    docstring).

    shap's own string masking writes `" " + mask_token` per masked run, so even an empty mask token would put a
    space into "@un|ited" and make an empty segment (a byte of an emoji) change the string. Here the kept segments
    are joined as they are: masking a feature removes exactly its text, and a token whose segment is empty is a null
    player. The partition tree is shap's over the segments, so with words it clusters words.
    """

    def __init__(self, encoder: PromptEncoder, features: str = "words"):
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        self.features = features
        segmenter = WordSegmenter() if features == "words" else TweetTokenizer(encoder)
        # The mask token is never written (see __call__); the constructor only needs one it can tokenize.
        super().__init__(segmenter, mask_token="...", collapse_mask_token=True)

    def __call__(self, mask, s):
        mask = self._standardize_mask(mask, s)
        self._update_s_cache(s)
        kept = "".join(segment for segment, keep in zip(self._segments_s, mask) if keep)
        return (np.array([normalize_tweet(kept)]),)


def tweet_masker(encoder: PromptEncoder, features: str = "words") -> TweetMasker:
    return TweetMasker(encoder, features)


def mask_tweet(masker: TweetMasker, text: str, keep: np.ndarray) -> str:
    """The tweet with the tokens where `keep` is False deleted, exactly as the explainer masks it."""
    return str(masker(np.asarray(keep, dtype=bool), text)[0][0])


def fit_to_budget(encoder: PromptEncoder, text: str, budget: int | None = None) -> tuple[str, bool]:
    """The tweet cut to the tokens the prompt keeps (the encoder truncates long tweets inside the tweet).

    `budget`: a smaller token budget, e.g. the tightest of several prompts explained on the same tweet.
    """
    budget = encoder.tweet_budget if budget is None else budget
    encoded = TweetTokenizer(encoder)(text)
    if len(encoded["input_ids"]) <= budget:
        return text, False
    return text[: encoded["offset_mapping"][budget - 1][1]], True


# ---- the value function -----------------------------------------------------------------------------------------
class LabelProbabilities:
    """Value function of one model: tweet strings -> label-token probabilities, shape (n, classes).

    Each tweet goes back into the prompt through `PromptEncoder.continuation` (the one prompt builder) and is scored
    by the model's `LabelScorer` (the one scorer; it enters the model's adapter state itself). `transform` maps the
    raw label probabilities to the explained ones (e.g. contextual calibration). With a `prefix_tree` scorer, the
    masked variants of one tweet share their leading tokens: each batch runs as one prefix tree, and inside
    `remembering()` later calls reuse the prefixes of earlier ones; the probabilities equal a plain forward's up to
    float rounding.
    """

    def __init__(self, scorer: LabelScorer, encoder: PromptEncoder, transform=None):
        self.scorer = scorer
        self.encoder = encoder
        self.transform = transform
        self.evaluations = 0

    @classmethod
    def for_model(
        cls,
        model,
        encoder: PromptEncoder,
        batch_size: int = 16,
        mode: str = "prefix_tree",
        state: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> LabelProbabilities:
        """The value function of a plain `*ForCausalLM` (or peft model) in the caller's state."""
        scorer = LabelScorer(
            model,
            encoder.prefix_ids,
            encoder.label_token_ids,
            mode=mode,
            head="labels",  # only the label tokens' logits are explained
            batch_size=batch_size,
            pad_token_id=encoder.tokenizer.pad_token_id or 0,
            state=state,
        )
        return cls(scorer, encoder, transform)

    @property
    def remembers(self) -> bool:
        """Whether calls inside `remembering()` reuse the prefixes earlier calls computed."""
        return self.scorer.remembers

    @contextlib.contextmanager
    def remembering(self) -> Iterator[None]:
        """Reuse computed tweet prefixes across calls inside the block (one tweet's explanation); forgotten after.

        Scoped to one tweet so that every tweet's values are computed the same way whichever tweets came before
        (resumed and sharded runs give the same values as a straight run with the same threads).
        """
        with self.scorer.remembering():
            yield

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        continuations = [self.encoder.continuation(str(text)) for text in texts]
        probabilities = self.scorer(continuations).probabilities
        self.evaluations += len(continuations)
        return probabilities if self.transform is None else self.transform(probabilities)


class JointValueFunction:
    """Several models' value functions as one: texts -> their probabilities side by side, (n, models x classes).

    Every explainer scores all models of a run through one of these, so two models' explanations are always
    computed on the same masked tweets.
    """

    def __init__(self, value_functions: Mapping[str, Callable[[Sequence[str]], np.ndarray]]):
        self.value_functions = dict(value_functions)
        self.names = list(value_functions)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(text) for text in texts]
        return np.concatenate([self.value_functions[name](texts) for name in self.names], axis=-1)

    def split(self, joint: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of each model (the last axis of a joint array)."""
        classes = joint.shape[-1] // len(self.names)
        return {name: joint[..., k * classes : (k + 1) * classes] for k, name in enumerate(self.names)}

    @property
    def remembers(self) -> bool:
        """Whether every model reuses computed tweet prefixes inside `remembering()`."""
        return all(getattr(fn, "remembers", False) for fn in self.value_functions.values())

    @contextlib.contextmanager
    def remembering(self) -> Iterator[None]:
        """Every model's prefix reuse for one tweet's evaluations (see `LabelProbabilities.remembering`)."""
        with contextlib.ExitStack() as stack:
            for function in self.value_functions.values():
                if hasattr(function, "remembering"):
                    stack.enter_context(function.remembering())
            yield


def model_value_functions(module, specs: Mapping, batch_size: int = 16) -> dict[str, LabelProbabilities]:
    """One value function per `analysis.models.ModelSpec` (prompt, adapter state, calibration), in eval mode."""
    module.eval()  # LoRA dropout off: explanations of a deterministic function
    return {
        name: LabelProbabilities(
            spec.scorer(module, mode="prefix_tree", head="labels", batch_size=batch_size), spec.encoder, spec.transform
        )
        for name, spec in specs.items()
    }


# ---- explaining one tweet ---------------------------------------------------------------------------------------
def evals_for_exact_owen(clustering: np.ndarray) -> int:
    """Evaluations the Partition explainer needs to expand every group in every context (exact Owen values).

    With `fixed_context=None` each expansion of a group costs 2 evaluations and queues each child twice (once
    with the sibling masked, once unmasked), so a group at depth d is expanded 2**d times; plus the full and the
    empty input.
    """
    clustering = np.asarray(clustering)
    n_leaves = len(clustering) + 1
    expansions = {2 * n_leaves - 2: 1} if len(clustering) else {}
    total = 0
    for row in range(len(clustering) - 1, -1, -1):  # parents come after their children in a linkage matrix
        count = expansions.get(n_leaves + row, 0)
        total += count
        for child in clustering[row, :2].astype(int):
            if child >= n_leaves:
                expansions[child] = expansions.get(child, 0) + 2 * count
    return 2 + 2 * total


def shared_credit_fraction(hierarchical_values: np.ndarray, n_tokens: int) -> np.ndarray:
    """Per output, the share of the attribution (sum of |node values|) left on groups the budget never split.

    With `fixed_context=None` the explainer leaves a value on a group node only when its budget runs out before
    the group is split (in some context); shap then spreads it over the group's tokens in proportion to their
    number, so that share of the credit says nothing about individual tokens. 0 means exact Owen values.
    """
    magnitude = np.abs(np.asarray(hierarchical_values, dtype=float))
    total = magnitude.sum(axis=0)
    return np.divide(magnitude[n_tokens:].sum(axis=0), total, out=np.zeros_like(total), where=total > 0)


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """shap breaks priority ties with the global numpy RNG: seed it per example (resumed runs match) and restore."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def explain_tweet(
    text: str,
    value_functions: Mapping[str, Callable[[Sequence[str]], np.ndarray]],
    masker: TweetMasker,
    max_evals: int,
    seed: int = 0,
) -> dict:
    """Partition-explain one (non-empty) tweet for every value function on the same coalitions.

    Returns `{"models": {name: {"values": (n_tokens, classes), "base_values": (classes,), "shared_credit_fraction":
    (classes,)}}, "data": segments, "feature_names", "evals_used", "evals_for_exact_owen"}`.
    """
    joint = JointValueFunction(value_functions)
    with joint.remembering():
        return _explain_tweet(text, joint, masker, max_evals, seed, score_openings=joint.remembers)


def group_members(clustering: np.ndarray) -> list[np.ndarray]:
    """Per node of a linkage matrix (leaves first, then its rows), the boolean mask of the features it holds."""
    clustering = np.asarray(clustering)
    n_tokens = len(clustering) + 1
    members = [np.arange(n_tokens) == leaf for leaf in range(n_tokens)]
    for left, right in clustering[:, :2].astype(int):  # a row's children come before it
        members.append(members[left] | members[right])
    return members


def exact_owen(text: str, joint: JointValueFunction, masker: TweetMasker) -> tuple[np.ndarray, np.ndarray, int]:
    """Exactly what shap's Partition explainer computes when its budget splits every group (`fixed_context=None`,
    `evals_for_exact_owen` evaluations), with every coalition scored in one call: (values (features, outputs), base
    values, evaluations asked for).

    Our own driver because with such a budget the coalitions do not depend on the model's answers: shap's priority
    queue only orders the work, in rounds of at most `MASKS_PER_ROUND` as the queue drains. Known up front, they go
    to the value function at once: a prefix-tree scorer then runs them as a few large trees in lexicographic order,
    computing each distinct prefix about once, instead of one small forward per round. The recursion is shap's
    `owen` without the queue: splitting group g in context C (weight w) scores C + left and C + right and queues each
    child in both contexts (its sibling absent and present) at weight w / 2; a single feature reached in context C
    with weight w gets (f(C + feature) - f(C)) x w. shap's Text masker gives every group a positive height (its
    rescaled size), so shap splits every group too. Values equal shap's up to float rounding (tests/test_analysis.py
    checks them against shap and against Owen's definition).
    """
    clustering = np.asarray(masker.clustering(text))
    n_tokens = len(clustering) + 1
    group = group_members(clustering)
    empty, full = np.zeros(n_tokens, dtype=bool), np.ones(n_tokens, dtype=bool)
    requested = [empty, full]
    # Each feature's value is a sum of (f(plus) - f(minus)) x weight over the contexts it is reached in: walk the tree
    # once for the coalitions and those terms, then score every coalition in one call.
    terms: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (feature, plus, minus, weight)
    stack = [(2 * n_tokens - 2, full, empty, 1.0)]  # (node, context + node, context, weight)
    while stack:
        node, plus, minus, weight = stack.pop()
        if node < n_tokens:
            terms.append((node, plus, minus, weight))
            continue
        left, right = clustering[node - n_tokens, :2].astype(int)
        with_left, with_right = minus | group[left], minus | group[right]
        requested += [with_left, with_right]
        half = weight / 2
        stack += [
            (right, plus, with_left, half),
            (left, plus, with_right, half),
            (right, with_right, minus, half),
            (left, with_left, minus, half),
        ]
    texts = {keep.tobytes(): mask_tweet(masker, text, keep) for keep in requested}
    unique = list(dict.fromkeys(texts.values()))
    scores = dict(zip(unique, joint(unique)))

    def f(keep: np.ndarray) -> np.ndarray:
        return scores[texts[keep.tobytes()]]

    values = np.zeros((n_tokens, len(scores[unique[0]])))
    for feature, plus, minus, weight in terms:
        values[feature] += (f(plus) - f(minus)) * weight
    return values, f(empty), len(requested)


def opening_coalitions(masker: TweetMasker, text: str, max_evals: int) -> list[str]:
    """The masked tweets the Partition explainer asks for first, whatever the model says: the empty and the full
    tweet, then every round whose queue it empties (each group split in both contexts), up to the first round that
    must choose by priority (`MASKS_PER_ROUND`) or would pass the budget.

    Scored together as one prefix tree before the explainer starts, the explainer's own first calls (one forward
    each, over tiny batches) then find every prefix remembered. If this list ever differed from shap's requests, the
    cost would be a wasted forward, never a wrong value: the values always come from the explainer's own calls.
    """
    clustering = np.asarray(masker.clustering(text))
    n_tokens = len(clustering) + 1
    group = group_members(clustering)
    masks = [np.zeros(n_tokens, dtype=bool), np.ones(n_tokens, dtype=bool)]
    queue = [(masks[0], 2 * n_tokens - 2)]  # (context, group to split), as the explainer queues them
    evaluated = 0
    while queue:
        internal = [(context, node) for context, node in queue if node >= n_tokens]
        if not internal or 2 * len(internal) > MASKS_PER_ROUND or evaluated + 2 * len(internal) > max_evals - 2:
            break
        queue = []
        for context, node in internal:
            left, right = clustering[node - n_tokens, :2].astype(int)
            with_left, with_right = context | group[left], context | group[right]
            masks += [with_left, with_right]
            queue += [(context, left), (context, right), (with_right, left), (with_left, right)]
        evaluated += 2 * len(internal)
    return [mask_tweet(masker, text, keep) for keep in masks]


def _explain_tweet(
    text: str,
    joint: JointValueFunction,
    masker: TweetMasker,
    max_evals: int,
    seed: int,
    score_openings: bool = False,
):
    segments = [str(segment) for segment in masker.data_transform(text)[0]]
    feature_names = [str(name) for name in masker.feature_names(text)[0]]
    if not segments:
        raise ValueError("an empty tweet has no tokens to explain; callers skip it")
    if len(segments) == 1:
        # shap cannot build a partition tree over one token; its Shapley value is exactly f(x) - f(empty).
        base, full = joint([""])[0], joint([text])[0]
        values, evals_used, evals_exact = (full - base)[None, :], 2, 2
        shared = np.zeros_like(full)
    elif max_evals >= (evals_exact := evals_for_exact_owen(masker.clustering(text))):
        # the budget splits every group: shap's result without its rounds (see `exact_owen`)
        values, base, evals_used = exact_owen(text, joint, masker)
        shared = np.zeros_like(base)  # every group split: no credit left on a group
    else:
        if score_openings:
            joint(opening_coalitions(masker, text, max_evals))  # one forward; the explainer's first calls reuse it
        explainer = shap.explainers.Partition(joint, masker)
        with seeded_numpy(seed):
            explanation = explainer([text], max_evals=max_evals, batch_size=MASKS_PER_ROUND, silent=True)
        values = np.asarray(explanation.values[0], dtype=float)
        base = np.asarray(explanation.base_values[0], dtype=float)
        evals_used = int(explainer.last_eval_count) + 2
        shared = shared_credit_fraction(explanation.hierarchical_values[0], len(segments))
    values_by, base_by, shared_by = joint.split(values), joint.split(base), joint.split(shared)
    models = {
        name: {"values": values_by[name], "base_values": base_by[name], "shared_credit_fraction": shared_by[name]}
        for name in joint.names
    }
    return {
        "models": models,
        "data": segments,
        "feature_names": feature_names,
        "evals_used": evals_used,
        "evals_for_exact_owen": evals_exact,
    }


def budget_resolution(n_tokens: int, max_evals: int, evals_used: int, evals_for_exact: int) -> str:
    """`exact` (every group split in every context), `approximate`, or `coarse` (some group never split)."""
    if evals_used >= evals_for_exact:
        return "exact"
    # M tokens have M - 1 groups to split at 2 evaluations each, after the 2 for the full and the empty tweet;
    # shap may overshoot its budget by one evaluation.
    return "approximate" if max_evals >= 2 * n_tokens - 1 else "coarse"


# ---- files: one record per example, gathered into one JSON per model ---------------------------------------------
def explanation_file_content(model: str, records: Sequence[dict], label_names: Sequence[str], settings: dict) -> dict:
    """The `<model>_shap.json` content from per-example records (see `analysis.explanation.run`)."""
    return {
        "model": model,
        "output_names": list(label_names),
        "values": [record["models"][model]["values"] for record in records],
        "base_values": [record["models"][model]["base_values"] for record in records],
        "data": [record["data"] for record in records],
        "feature_names": [record["feature_names"] for record in records],
        "target_classes": [record["models"][model]["target"] for record in records],
        "target_names": [label_names[record["models"][model]["target"]] for record in records],
        "example_indices": [record["index"] for record in records],
        "texts": [record["text"] for record in records],
        "gold": [record["gold"] for record in records],
        "predicted": [record["models"][model]["predicted"] for record in records],
        "probabilities": [record["models"][model]["probabilities"] for record in records],
        "additivity_error": [record["models"][model]["additivity_error"] for record in records],
        "settings": settings,
    }


def load_explanation(path: str | os.PathLike, target_only: bool = False) -> shap.Explanation:
    """A `<model>_shap.json` file as a `shap.Explanation` (ragged: one row per example).

    values[i] is (n_tokens_i, classes); with `target_only` it is (n_tokens_i,) for that example's target class and
    base_values[i] the target's base value, ready for `shap.plots.text(explanation[i])`.
    """
    content = json.loads(Path(path).read_text())
    values = [np.asarray(v, dtype=float).reshape(len(d), -1) for v, d in zip(content["values"], content["data"])]
    base = np.asarray(content["base_values"], dtype=float)
    data = [np.asarray(segments, dtype=object) for segments in content["data"]]
    if target_only:
        targets = content["target_classes"]
        return shap.Explanation(
            values=[v[:, t] for v, t in zip(values, targets)],
            base_values=base[np.arange(len(targets)), targets] if len(targets) else base,
            data=data,
            feature_names=content["feature_names"],
        )
    return shap.Explanation(
        values=values,
        base_values=base,
        data=data,
        feature_names=content["feature_names"],
        output_names=content["output_names"],
    )


def target_values(content: Mapping) -> list[np.ndarray]:
    """Each example's SHAP values for its target class, from a `<model>_shap.json` content dict."""
    return [np.asarray(v, dtype=float)[:, t] for v, t in zip(content["values"], content["target_classes"])]
