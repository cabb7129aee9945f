"""SHAP analysis: value function, features, additivity, model states, resume, and the CLI run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest
import shap
import torch

from analysis.explanation.shap_values import (
    LabelProbabilities,
    explain_tweet,
    load_explanation,
    mask_tweet,
    model_value_functions,
    tweet_masker,
)
from analysis.models import CALIBRATED, FINE_TUNED, K_SHOT, ZERO_SHOT, ModelSpec
from analysis.statistics.calibration import calibrate
from datamodules.prompts import PromptEncoder
from foundation.output_names import EXPLANATIONS_FILE, INTERPRETABILITY_FILE, shap_file, shap_summary_plot
from tests.tiny import build_tiny_tokenizer, save_tiny_llama, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
TWEETS = ["love", "the bus is so awful , really", "my really happy monday day this is so great the a my table bus"]
# Runs that differ in thread count (torchrun ranks take one thread each) sum in another order: their values agree to
# CROSS_THREAD_ATOL and the statistics derived from them to CROSS_THREAD_RTOL, not bit for bit. Runs with the same
# threads and shapes (resumed, sharded in one process) agree exactly.
CROSS_THREAD_ATOL = 1e-6
CROSS_THREAD_RTOL = 1e-4


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder(build_tiny_tokenizer(), LABELS)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def tiny_module(model_dir: str, encoder: PromptEncoder):
    from lightning_modules import LoRASentimentClassifier

    return LoRASentimentClassifier(
        model_name=model_dir,
        label_names=LABELS,
        label_token_ids=encoder.label_token_ids,
        load_in_4bit=False,
        lora_dropout=0.0,
    )


@torch.no_grad()
def plain_forward(model, encoder: PromptEncoder, texts) -> np.ndarray:
    """Label probabilities from one plain `model(...).logits` forward per whole prompt: the independent oracle."""
    rows = []
    for text in texts:
        logits = model(torch.tensor([encoder.encode(str(text)).input_ids])).logits[0, -1]
        rows.append(torch.softmax(logits[encoder.label_token_ids].double(), dim=-1).numpy())
    return np.array(rows)


def analyze(trained: dict, output_dir: Path, log=lambda message: None, after_example=None, **options):
    """scripts/analyze.py's parsing and run, in this process; `options` are `explain`/`compare` settings."""
    from analysis.configuration import load_run
    from analysis.explanation.checks import check_explanation
    from analysis.explanation.run import run_analysis

    options = {"example_count": 3, "max_evals": 40, "n_resamples": 50, "adapter": str(trained["adapter"]), **options}
    arguments = ["--config", str(trained["config"]), "--explain.output_dir", str(output_dir)]
    for name, value in options.items():
        section = "compare" if name in ("adapter", "k_shot", "n_resamples", "seed") else "explain"
        arguments += [f"--{section}.{name}", json.dumps(value) if not isinstance(value, str) else value]
    return run_analysis(load_run(arguments, check=check_explanation), log=log, after_example=after_example)


# ---- features and value function --------------------------------------------------------------------------------
def test_only_the_tweet_tokens_are_features(encoder):
    masker = tweet_masker(encoder, "tokens")
    tokenizer = encoder.tokenizer
    for text in TWEETS:
        names = masker.feature_names(text)[0]
        tokens = [tokenizer.decode([i]).strip() for i in encoder.tweet_ids(text)]
        assert names == tokens
        assert "".join(masker.data_transform(text)[0]) == text
        assert not {"Classify", "Tweet", "Label", "sentiment", "classifier"} & set(names)
    text = TWEETS[1]
    keep = np.ones(len(encoder.tweet_ids(text)), dtype=bool)
    keep[[1, 4]] = False  # "bus", "awful": deleted, not replaced by a placeholder
    masked = mask_tweet(masker, text, keep)
    assert masked == "the is so , really"
    prompt = encoder.prefix_ids + encoder.continuation(masked)
    assert prompt[-len(encoder.tail_ids) :] == encoder.tail_ids  # the template stays fixed context
    assert mask_tweet(masker, text, np.zeros_like(keep)) == ""


def test_features_tile_a_byte_level_tweet_with_emoji():
    from foundation.hub import load_tokenizer

    encoder = PromptEncoder(load_tokenizer("embedded:smollm2-135m-instruct"), LABELS)
    masker = tweet_masker(encoder, "tokens")
    text = "@united I can't believe 😡😡 it's late <again> & again!!"
    segments = masker.data_transform(text)[0]
    assert "".join(segments) == text  # byte tokens of one emoji do not duplicate it
    assert len(segments) == len(encoder.tweet_ids(text))
    assert encoder.continuation(mask_tweet(masker, text, np.ones(len(segments), bool))) == encoder.continuation(text)


def test_words_are_whitespace_units_that_tile_the_tweet():
    from foundation.hub import load_tokenizer

    encoder = PromptEncoder(load_tokenizer("embedded:smollm2-135m-instruct"), LABELS)
    masker = tweet_masker(encoder)  # words: the default features
    text = "@united I can't believe 😡😡 it's late, <again> & #fail again!! naïve café 日本語"
    words = text.split()
    assert masker.feature_names(text)[0] == words  # a mention, a hashtag, an emoji run, punctuation kept on
    segments = masker.data_transform(text)[0]
    assert "".join(segments) == text and len(segments) == len(words)
    assert len(encoder.tweet_ids(text)) > len(words) + 5  # "@united", the emoji, "日本語" are several tokens each
    keep = np.ones(len(words), dtype=bool)
    keep[[0, 4, 9]] = False  # "@united", "😡😡", "#fail": every token of each goes together
    assert mask_tweet(masker, text, keep) == " ".join(word for word, kept in zip(words, keep) if kept)
    assert mask_tweet(masker, text, np.zeros(len(words), dtype=bool)) == ""
    assert masker.clustering(text).shape == (len(words) - 1, 4)  # the partition tree clusters words


def test_value_function_equals_a_plain_forward_of_each_prompt(encoder, base_model):
    masker = tweet_masker(encoder, "tokens")
    rng = np.random.default_rng(0)
    texts = [mask_tweet(masker, t, rng.random(len(encoder.tweet_ids(t))) < 0.6) for t in TWEETS for _ in range(4)]
    texts += TWEETS + [""]
    value = LabelProbabilities.for_model(base_model, encoder, batch_size=5)
    with value.remembering():
        cached = value(texts)
        again = value(texts[::-1])[::-1]  # every prefix remembered from the call before
    assert cached.shape == (len(texts), len(LABELS))
    assert np.abs(cached - plain_forward(base_model, encoder, texts)).max() <= 1e-5
    assert np.abs(again - cached).max() <= 1e-5
    assert np.allclose(cached.sum(axis=1), 1.0)


def test_additivity_and_the_budget(encoder, base_model):
    value = LabelProbabilities.for_model(base_model, encoder, batch_size=8)
    masker = tweet_masker(encoder, "tokens")
    for text in TWEETS:
        full, empty = value([text])[0], value([""])[0]
        for max_evals in (4, 10_000):
            explained = explain_tweet(text, {"m": value}, masker, max_evals)
            values, base = explained["models"]["m"]["values"], explained["models"]["m"]["base_values"]
            assert values.shape == (len(encoder.tweet_ids(text)), len(LABELS))
            np.testing.assert_allclose(base, empty, atol=1e-6)  # masked = deleted: the base is the empty tweet
            np.testing.assert_allclose(base + values.sum(axis=0), full, atol=1e-6)  # every class, any budget
            assert explained["evals_used"] <= max(max_evals + 1, 2)
        assert explained["evals_used"] == explained["evals_for_exact_owen"]  # a large budget is not all spent


def test_opening_coalitions_are_the_explainers_first_requests(encoder, base_model):
    """What is scored ahead in one forward is exactly what the explainer asks for first, in any budget; scoring it
    ahead changes no value beyond float rounding."""
    from analysis.explanation.shap_values import MASKS_PER_ROUND, evals_for_exact_owen, opening_coalitions

    masker = tweet_masker(encoder)
    text = max(TWEETS, key=lambda t: len(encoder.tweet_ids(t)))
    value = LabelProbabilities.for_model(base_model, encoder, batch_size=8)
    plain = LabelProbabilities.for_model(base_model, encoder, batch_size=8, mode="padded")  # no lookahead
    assert value.remembers and not plain.remembers
    # budgets below the full expansion: shap's own rounds (a full budget skips them, see the tests below)
    for max_evals in (6, 12, evals_for_exact_owen(masker.clustering(text)) - 2):
        requests: list[list[str]] = []

        def recording(texts, requests=requests):
            requests.append([str(t) for t in texts])
            return plain(texts)

        explained = explain_tweet(text, {"m": recording}, masker, max_evals)  # records shap's calls, in order
        opening = opening_coalitions(masker, text, max_evals)
        asked = [t for call in requests for t in call]
        # the first requests (a round's order follows the priorities, its set does not), and none past the budget
        assert sorted(asked[: len(opening)]) == sorted(opening)
        assert len(opening) <= max(max_evals, 2) and len(opening) >= min(max_evals, 4)
        assert max(len(call) for call in requests) <= MASKS_PER_ROUND
        ahead = explain_tweet(text, {"m": value}, masker, max_evals)
        np.testing.assert_allclose(ahead["models"]["m"]["values"], explained["models"]["m"]["values"], atol=1e-6)


def test_a_full_budget_gives_shaps_values_in_one_call(encoder, base_model):
    """A budget that splits every group skips shap's rounds (`exact_owen`): values, base values, shared credit and
    evaluation count are those of shap's own Partition explainer on the same value function, with every coalition
    asked for in one call."""
    from analysis.explanation.shap_values import MASKS_PER_ROUND, shared_credit_fraction

    plain = LabelProbabilities.for_model(base_model, encoder, batch_size=8, mode="padded")
    cases = [("words", TWEETS[1]), ("words", TWEETS[2]), ("tokens", TWEETS[1]), ("tokens", "i can't love this bus")]
    for features, text in cases:
        masker = tweet_masker(encoder, features)
        calls: list[int] = []

        def recording(texts, calls=calls):
            calls.append(len(texts))
            return plain(texts)

        explained = explain_tweet(text, {"m": recording}, masker, max_evals=10_000)
        ours = explained["models"]["m"]
        assert len(calls) == 1
        explainer = shap.explainers.Partition(plain, masker)
        theirs = explainer([text], max_evals=10_000, batch_size=MASKS_PER_ROUND, silent=True)
        n_features = len(theirs.values[0])
        np.testing.assert_allclose(ours["values"], theirs.values[0], atol=1e-6)
        np.testing.assert_allclose(ours["base_values"], theirs.base_values[0], atol=1e-6)
        shared = shared_credit_fraction(theirs.hierarchical_values[0], n_features)
        np.testing.assert_allclose(ours["shared_credit_fraction"], shared, atol=1e-6)
        assert explained["evals_used"] == explainer.last_eval_count + 2


def test_a_full_budget_gives_owen_values_by_their_definition(encoder, base_model):
    """Owen values against their definition: marginal contributions averaged over every ordering of the words in
    which every group of the partition tree stays together, each coalition one plain forward."""
    import itertools

    text = TWEETS[1]
    words = text.split()
    n = len(words)
    masker = tweet_masker(encoder, "words")
    clustering = np.asarray(masker.clustering(text))
    groups = [{leaf} for leaf in range(n)]
    for left, right in clustering[:, :2].astype(int):
        groups.append(groups[left] | groups[right])
    coalitions = [frozenset(i for i in range(n) if bits >> i & 1) for bits in range(2**n)]
    kept = [" ".join(w for i, w in enumerate(words) if i in members) for members in coalitions]
    value = dict(zip(coalitions, plain_forward(base_model, encoder, kept)))
    phi, orderings = np.zeros((n, len(LABELS))), 0
    for order in itertools.permutations(range(n)):
        position = {feature: k for k, feature in enumerate(order)}
        if any(max(position[i] for i in g) - min(position[i] for i in g) + 1 != len(g) for g in groups[n:]):
            continue
        orderings += 1
        members: frozenset = frozenset()
        for i in order:
            phi[i] += value[members | {i}] - value[members]
            members = members | {i}
    phi /= orderings
    assert orderings == 2 ** (n - 1)  # a binary tree: each group's two halves in either order
    plain = LabelProbabilities.for_model(base_model, encoder, batch_size=8, mode="padded")
    explained = explain_tweet(text, {"m": plain}, masker, max_evals=10_000)
    np.testing.assert_allclose(explained["models"]["m"]["values"], phi, atol=1e-6)
    np.testing.assert_allclose(explained["models"]["m"]["base_values"], value[frozenset()], atol=1e-6)


# ---- model states -----------------------------------------------------------------------------------------------
def test_zero_shot_differs_from_fine_tuned_and_is_the_plain_base_model(encoder, tiny_model_dir, base_model):
    torch.manual_seed(0)
    module = tiny_module(tiny_model_dir, encoder)
    with torch.no_grad():
        for name, parameter in module.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # a non-trivial adapter (B starts at zero)
    specs = {ZERO_SHOT: ModelSpec(ZERO_SHOT, encoder, False), FINE_TUNED: ModelSpec(FINE_TUNED, encoder, True)}
    functions = model_value_functions(module, specs, batch_size=8)
    masker = tweet_masker(encoder)
    plain = LabelProbabilities.for_model(base_model, encoder, batch_size=8, mode="padded")
    for text in TWEETS[1:]:
        joint = explain_tweet(text, functions, masker, max_evals=10_000, seed=3)
        alone = explain_tweet(text, {"base": plain}, masker, max_evals=10_000, seed=3)
        zero_shot, fine_tuned = joint["models"][ZERO_SHOT]["values"], joint["models"][FINE_TUNED]["values"]
        np.testing.assert_allclose(zero_shot, alone["models"]["base"]["values"], atol=1e-5)
        assert np.abs(fine_tuned - zero_shot).max() > 1e-3
    assert functions[ZERO_SHOT].scorer.prefix_cache is not functions[FINE_TUNED].scorer.prefix_cache


# ---- the whole run ----------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def comparable(folder: Path, html: bool = True) -> dict:
    """Every output's content except wall-clock timings."""
    metrics = json.loads((folder / INTERPRETABILITY_FILE).read_text())
    metrics.pop("timing")
    contents = {"metrics": metrics}
    for model in (ZERO_SHOT, CALIBRATED, K_SHOT, FINE_TUNED):
        if (folder / shap_file(model)).exists():
            contents[model] = json.loads((folder / shap_file(model)).read_text())
    if html:
        contents["html"] = (folder / EXPLANATIONS_FILE).read_text()
    return contents


def assert_close_results(got, expected, atol: float, rtol: float = 0.0, where: str = "") -> None:
    """Same structure, same strings and integers, and floats within `atol` (or `rtol` relative) of each other."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), where
        for key in expected:
            assert_close_results(got[key], expected[key], atol, rtol, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close_results(a, b, atol, rtol, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(got, float):
        assert got == pytest.approx(expected, abs=atol, rel=rtol), where
    else:
        assert got == expected, where


def test_a_killed_run_resumes_without_recomputing(trained, tmp_path):
    def stop_after_first(index: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        analyze(trained, tmp_path / "resumed", after_example=stop_after_first)
    progress = tmp_path / "resumed" / ".progress"
    assert sorted(p.name for p in progress.glob("[0-9]*.json")) == ["0.json"]
    assert not (tmp_path / "resumed" / INTERPRETABILITY_FILE).exists()
    first = (progress / "0.json").stat().st_mtime_ns

    resumed = analyze(trained, tmp_path / "resumed")
    assert resumed.resumed == [0] and resumed.computed == [1, 2]  # the empty row was dropped by the loader
    assert (progress / "0.json").stat().st_mtime_ns == first
    again = analyze(trained, tmp_path / "resumed")
    assert again.computed == [] and again.resumed == [0, 1, 2]

    straight = analyze(trained, tmp_path / "straight")
    assert comparable(tmp_path / "resumed") == comparable(tmp_path / "straight")

    changed = analyze(trained, tmp_path / "resumed", max_evals=30)  # other settings: old progress is discarded
    assert changed.computed == [0, 1, 2] and any("discarded" in note for note in changed.notes)
    assert straight.metrics["additivity"]["max_abs_error"] < 1e-4


def test_baselines_are_explained_on_the_same_tweet_tokens(trained, tmp_path, tiny_model_dir, base_model):
    from transformers import AutoTokenizer

    out = tmp_path / "baselines"
    result = analyze(trained, out, example_count=2, baselines=[ZERO_SHOT, CALIBRATED, K_SHOT], k_shot=3)
    models = [ZERO_SHOT, CALIBRATED, K_SHOT, FINE_TUNED]
    assert result.models == models and result.metrics["models"] == models
    contents = {model: json.loads((out / shap_file(model)).read_text()) for model in models}
    for model in models:  # same features (the tweet's tokens), and every model's values add up
        assert contents[model]["feature_names"] == contents[ZERO_SHOT]["feature_names"]
        assert result.metrics["additivity"]["per_model"][model] < 1e-4

    settings = result.metrics["settings"]["models"]
    prior = np.asarray(settings[CALIBRATED]["calibration"]["prior"])
    raw = np.asarray(contents[ZERO_SHOT]["probabilities"])
    np.testing.assert_allclose(contents[CALIBRATED]["probabilities"], calibrate(raw, prior), atol=1e-9)
    assert np.abs(np.asarray(contents[CALIBRATED]["values"][0]) - contents[ZERO_SHOT]["values"][0]).max() > 1e-4

    # The k-shot value function is the base model reading the demonstrations, then the tweet: a plain forward.
    shots = [(shot["text"], shot["label"]) for shot in settings[K_SHOT]["demonstrations"]]
    assert len(shots) == 3 and sorted(label for _, label in shots) == [0, 1, 2]
    k_encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir), LABELS, demonstrations=shots)
    with torch.no_grad():
        for text, probabilities in zip(contents[K_SHOT]["texts"], contents[K_SHOT]["probabilities"]):
            logits = base_model(torch.tensor([k_encoder.encode(text).input_ids])).logits[0, -1]
            expected = torch.softmax(logits[k_encoder.label_token_ids].double(), -1).numpy()
            np.testing.assert_allclose(probabilities, expected, atol=1e-5)

    comparisons = result.metrics["comparisons"]
    assert list(comparisons) == [f"fine_tuned_vs_{m}" for m in models[:3]]
    assert comparisons["fine_tuned_vs_k_shot"]["models"] == [K_SHOT, FINE_TUNED]
    assert result.metrics["comparison"] == comparisons["fine_tuned_vs_zero_shot"]
    assert {"k_shot_mean", "fine_tuned_mean"} <= set(comparisons["fine_tuned_vs_k_shot"]["paired_tests"]["gini"])
    assert "fine_tuned_vs_zero_shot_calibrated" in result.metrics["faithfulness"]

    # Baselines only (no adapter): nothing of the fine-tuned model is left from the run above.
    alone = analyze(trained, out, example_count=2, adapter=None)
    assert alone.models == [ZERO_SHOT] and "comparison" not in alone.metrics
    assert {p.name for p in out.glob("*_shap.json")} == {shap_file(ZERO_SHOT)}
    assert not (out / shap_summary_plot(FINE_TUNED)).exists() and alone.metrics["settings"]["adapter"] is None


def test_shards_merge_into_the_single_process_result(trained, tmp_path):
    straight = analyze(trained, tmp_path / "straight")
    first = analyze(trained, tmp_path / "sharded", shard_index=0, num_shards=2)
    assert not first.merged and first.computed == [0, 2] and not (tmp_path / "sharded" / INTERPRETABILITY_FILE).exists()
    last = analyze(trained, tmp_path / "sharded", shard_index=1, num_shards=2)
    assert last.merged and last.resumed == [0, 2] and last.computed == [1]
    assert comparable(tmp_path / "sharded") == comparable(tmp_path / "straight")
    assert last.metrics["n_examples"] == straight.metrics["n_examples"] == 3


@pytest.mark.slow
def test_torchrun_ranks_share_the_examples(trained, tmp_path):
    straight = tmp_path / "straight"
    analyze(trained, straight)
    out = tmp_path / "torchrun"
    flags = ["--config", str(trained["config"]), "--adapter", str(trained["adapter"]), "--output-dir", str(out)]
    flags += ["--shap-example-count", "3", "--shap-max-evals", "40", "--n-resamples", "50"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
        + [str(ROOT / "scripts" / "analyze.py"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "explained 3 tweets" in done.stdout and "of this shard" in done.stdout  # rank 0 merged, rank 1 did not
    assert sorted(p.name for p in (out / ".progress").glob("[0-9]*.json")) == ["0.json", "1.json", "2.json"]
    # rank 0 and 1 ran one thread each, the straight run two: equal to the stated tolerance, not bit for bit
    sharded, alone = comparable(out, html=False), comparable(straight, html=False)
    for model in (ZERO_SHOT, FINE_TUNED):  # the values and probabilities themselves: absolute
        assert_close_results(sharded.pop(model), alone.pop(model), CROSS_THREAD_ATOL)
    # statistics derived from them (a Cohen's d divides by a small spread) move by as much relative to their size
    assert_close_results(sharded, alone, CROSS_THREAD_ATOL, rtol=CROSS_THREAD_RTOL)


def test_comparisons_read_one_target_and_explain_the_fine_tuning_effect(trained, tmp_path):
    out = tmp_path / "effect"
    metrics = analyze(trained, out, example_count=12, max_evals=400).metrics
    files = {model: json.loads((out / shap_file(model)).read_text()) for model in (ZERO_SHOT, FINE_TUNED)}
    zs, ft = files[ZERO_SHOT], files[FINE_TUNED]
    gold = zs["gold"]
    key = "fine_tuned_vs_zero_shot"
    assert metrics["target"]["comparison_target"] == "gold"
    assert metrics["target"]["same_target_fraction"] == {key: 1.0}
    assert [row["comparison_target"] for row in metrics["target"]["per_example"]] == gold
    assert zs["target_classes"] == zs["predicted"]  # per-model statistics keep each model's own prediction

    # the comparison reads both models at the gold class: its mean cosine, by hand from the files
    first = [np.asarray(v)[:, t] for v, t in zip(zs["values"], gold)]
    second = [np.asarray(v)[:, t] for v, t in zip(ft["values"], gold)]
    cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(first, second)]
    assert metrics["comparisons"][key]["cosine_similarity"]["mean"] == pytest.approx(np.mean(cosines), abs=1e-9)

    # dphi explains the difference of the two models' probabilities: sum = df(x) - df(empty)
    effect = metrics["fine_tuning_effect"][key]
    assert effect["models"] == [ZERO_SHOT, FINE_TUNED] and len(effect["per_example"]) == 12
    for k, (row, t) in enumerate(zip(effect["per_example"], gold)):
        np.testing.assert_allclose(row["delta"], second[k] - first[k], atol=1e-12)
        f_x = ft["probabilities"][k][t] - zs["probabilities"][k][t]
        f_empty = ft["base_values"][k][t] - zs["base_values"][k][t]
        assert sum(row["delta"]) == pytest.approx(f_x - f_empty, abs=1e-5)
    assert effect["max_additivity_error"] < 1e-5
    assert all(row["n_tweets"] >= 3 for row in effect["words"]) and effect["words"]

    # strata of correctness, counted by hand
    counts = {"both_correct": 0, "fixed": 0, "broken": 0, "both_wrong": 0}
    for g, a, b in zip(gold, zs["predicted"], ft["predicted"]):
        name = {(True, True): "both_correct", (False, True): "fixed", (True, False): "broken"}.get(
            (a == g, b == g), "both_wrong"
        )
        counts[name] += 1
    strata = metrics["comparisons"][key]["strata"]
    assert {name: strata[name]["n_examples"] for name in counts} == counts
    for name, n in counts.items():
        assert ("note" in strata[name]) == (n < 5) and ("cosine_similarity" in strata[name]) == (n >= 5)


def test_auto_budget_gives_exact_values_and_flags_capped_tweets(trained, tmp_path):
    exact = analyze(trained, tmp_path / "auto", example_count=4, max_evals="auto").metrics
    budget = exact["budget"]
    assert budget["max_evals"] == "auto" and budget["capped_examples"] == [] and budget["counts"]["exact"] == 4
    for row in budget["per_example"]:  # every split of every tweet's partition tree resolved: no shared credit
        assert row["evals_used"] == row["evals_for_exact_owen"] == row["max_evals"] and not row["capped"]
        assert set(row["shared_credit_fraction"].values()) == {0.0}

    capped = analyze(trained, tmp_path / "capped", example_count=4, max_evals="auto", max_evals_cap=6)
    budget = capped.metrics["budget"]
    assert budget["capped_examples"] == [row["index"] for row in budget["per_example"]] and budget["max_evals_cap"] == 6
    assert all(row["capped"] and row["resolution"] != "exact" for row in budget["per_example"])
    assert any("--explain.max_evals_cap" in note for note in capped.notes)


def test_exact_shapley_check_matches_brute_force_over_every_ordering(trained, tmp_path, tiny_model_dir):
    """The analysis' exact Shapley values of short tweets against the definition: marginal contributions averaged
    over every ordering of the words, each coalition a plain forward of the fine-tuned (peft) model."""
    import itertools
    import math

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exact"
    check = analyze(trained, out, example_count=4, exact_shapley_check=2).metrics["exact_shapley_check"]
    assert len(check["examples"]) == 2 and check["eligible"] == 4
    texts = dict(zip(*(json.loads((out / shap_file(FINE_TUNED)).read_text())[k] for k in ("example_indices", "texts"))))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained["adapter"]).eval()
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir), LABELS)
    for row in check["examples"]:
        words = texts[row["index"]].split()
        result = row["models"][FINE_TUNED]
        t, n = result["target"], len(words)
        coalitions = [frozenset(i for i in range(n) if bits >> i & 1) for bits in range(2**n)]
        kept = [" ".join(w for i, w in enumerate(words) if i in members) for members in coalitions]
        value = dict(zip(coalitions, plain_forward(tuned, encoder, kept)[:, t]))
        phi = np.zeros(n)
        for order in itertools.permutations(range(n)):
            members: frozenset = frozenset()
            for i in order:
                phi[i] += value[members | {i}] - value[members]
                members = members | {i}
        phi /= math.factorial(n)
        np.testing.assert_allclose(result["shapley"], phi, atol=1e-5)
        assert phi.sum() == pytest.approx(value[frozenset(range(n))] - value[frozenset()], abs=1e-9)
        assert result["shapley_additivity_error"] < 1e-6
        owen = np.asarray(result["owen"])
        assert result["relative_l2"] == pytest.approx(np.linalg.norm(owen - phi) / np.linalg.norm(phi), abs=1e-4)


def test_token_features_explain_the_tokens_as_before(trained, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoder = PromptEncoder(tokenizer, LABELS)
    analyze(trained, tmp_path / "w", example_count=2)
    words = json.loads((tmp_path / "w" / shap_file(ZERO_SHOT)).read_text())
    analyze(trained, tmp_path / "t", example_count=2, features="tokens")
    tokens = json.loads((tmp_path / "t" / shap_file(ZERO_SHOT)).read_text())
    text = tokens["texts"][0]
    assert text == '<b>love</b> & "great" so'
    pieces = ["<", "b", ">", "love", "<", "/", "b", ">", "&", '"', "great", '"', "so"]  # the tiny tokenizer's
    assert tokens["feature_names"][0] == pieces and len(encoder.tweet_ids(text)) == len(pieces)
    assert words["feature_names"][0] == ["<b>love</b>", "&", '"great"', "so"]
    assert tokens["settings"]["features"] == "tokens" and words["settings"]["features"] == "words"


def test_gold_target_and_small_budget_are_recorded(trained, tmp_path):
    result = analyze(trained, tmp_path / "gold", target="gold", max_evals=4, example_count=50)
    content = json.loads((tmp_path / "gold" / shap_file(FINE_TUNED)).read_text())
    assert content["target_classes"] == content["gold"]
    notes = " ".join(result.notes)
    assert "larger than the eval set; explaining all 24" in notes
    assert "empty tweet" in notes
    assert "shared equally by their features" in notes and "too many features for even one split" in notes
    assert result.metrics["budget"]["counts"]["coarse"] > 0
    assert result.metrics["target"]["source"] == "gold"


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    entry = ["-m", "analysis"] if module else [str(ROOT / "scripts" / "analyze.py")]
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_analyze_script_writes_every_file(trained, tmp_path):
    out = tmp_path / "analysis"
    result = run_cli(
        "--config",
        str(trained["config"]),
        "--adapter",
        str(trained["adapter"]),
        "--output-dir",
        str(out),
        "--shap-example-count",
        "3",
        "--shap-max-evals",
        "60",
        "--n-resamples",
        "50",
    )
    assert result.returncode == 0, result.stderr
    assert "additivity" in result.stdout

    assert not (out / shap_file(K_SHOT)).exists()  # only the models asked for
    contents = {model: json.loads((out / shap_file(model)).read_text()) for model in (ZERO_SHOT, FINE_TUNED)}
    for model, content in contents.items():
        explanation = load_explanation(out / shap_file(model))
        assert isinstance(explanation, shap.Explanation) and len(explanation) == 3
        assert list(explanation.output_names) == LABELS
        for i in range(3):
            n_tokens = len(content["feature_names"][i])
            assert explanation[i].values.shape == (n_tokens, len(LABELS))
            assert "".join(explanation[i].data) == content["texts"][i]
            probabilities = np.asarray(content["probabilities"][i])
            np.testing.assert_allclose(
                explanation[i].base_values + explanation[i].values.sum(0), probabilities, atol=1e-5
            )
        target = load_explanation(out / shap_file(model), target_only=True)
        assert target[0].values.shape == (len(content["feature_names"][0]),)
        assert content["target_classes"] == content["predicted"]
        assert (out / shap_summary_plot(model)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert contents[ZERO_SHOT]["feature_names"] == contents[FINE_TUNED]["feature_names"]  # identical features
    assert contents[ZERO_SHOT]["texts"][0] == '<b>love</b> & "great" so'

    metrics = json.loads((out / INTERPRETABILITY_FILE).read_text())
    assert metrics["additivity"]["max_abs_error"] < 1e-4 and metrics["additivity"]["within_tolerance"]
    for model in (ZERO_SHOT, FINE_TUNED):
        targets = [np.asarray(v)[:, t] for v, t in zip(contents[model]["values"], contents[model]["target_classes"])]
        assert metrics[model]["mean_abs_importance"] == pytest.approx(np.abs(np.concatenate(targets)).mean())
        for key in ("std_abs_importance", "median_abs_importance", "mean_gini", "mean_entropy", "top_tokens"):
            assert key in metrics[model]
        faithfulness = metrics["faithfulness"][model]
        for mode in ("comprehensiveness", "sufficiency"):
            assert faithfulness[mode]["n"] == 3 and "mean_aopc" in faithfulness[f"{mode}_random"]
            assert "wilcoxon_p" in faithfulness[f"{mode}_attribution_vs_random"]
    comparison = metrics["comparison"]
    for key in ("cosine_similarity", "top5_overlap", "top10_overlap", "top_token_jaccard", "pearson", "spearman"):
        assert set(comparison[key]) == {"mean", "ci_low", "ci_high", "n"}
    for key in ("mean_abs", "gini", "entropy"):
        assert {"ci_low", "ci_high", "wilcoxon_p", "cohens_d"} <= set(comparison["paired_tests"][key])
    assert comparison["per_model"] and comparison["overall_top_token_jaccard"] is not None
    assert (out / "deletion_curves.png").read_bytes()[:4] == b"\x89PNG"

    page = (out / EXPLANATIONS_FILE).read_text()
    assert "&lt;" in page and "<b>love" not in page and "&amp;" in page  # the tweet's HTML is escaped
    for segments in contents[ZERO_SHOT]["data"]:
        for segment in segments:
            assert escape(segment) in page
    assert "http" not in page and "<script" not in page  # self-contained

    from tests.test_report_browser import visible_text

    last = result.stdout.splitlines()[-1]
    assert last.startswith("report: ") and Path(last[8:]) == (out / "report.html").resolve()  # printed last
    text = visible_text((out / "report.html").read_text())
    for model in (ZERO_SHOT, FINE_TUNED):
        assert f"{metrics[model]['mean_abs_importance']:.4f}" in text
    cosine = metrics["comparison"]["cosine_similarity"]
    assert f"{cosine['mean']:.4f} [{cosine['ci_low']:.4f}, {cosine['ci_high']:.4f}]" in text


def test_bad_input_is_one_error_line(trained, tmp_path, capsys):
    from analysis.commands import analyze_main as main

    other_dir = save_tiny_llama(tmp_path / "other-base", seed=1)
    other_config = write_tiny_config(tmp_path / "other.yaml", str(other_dir), trained["data"], tmp_path / "train")
    args = ["--config", str(other_config), "--adapter", str(trained["adapter"]), "--output-dir", str(tmp_path / "x")]
    result = run_cli(*args, module=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was trained on" in errors[0], result.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the inputs are checked

    capsys.readouterr()
    missing = main(["--config", str(trained["config"]), "--adapter", str(tmp_path / "nope"), "--output-dir", "y"])
    stderr = capsys.readouterr().err
    assert missing == 2 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: The adapter '{tmp_path / 'nope'}' does not exist; pass a lora_adapter/ folder or a .ckpt file."
    ]


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    from analysis.configuration import load_run
    from analysis.explanation.checks import check_explanation
    from analysis.explanation.run import run_analysis
    from lightning_modules.export_adapter import write_adapter

    config = ["--config", "configs/embedded.yaml"]
    run = load_run(config)
    datamodule, module = run.datamodule, run.module
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    adapter = write_adapter(module, tmp_path / "lora_adapter", datamodule.prompt_description())
    del module
    options = ["--explain.output_dir", str(tmp_path / "out"), "--compare.adapter", str(adapter)]
    options += ["--explain.example_count", "2", "--explain.max_evals", "8", "--compare.n_resamples", "50"]
    options += ["--explain.random_orders", "1"]
    result = run_analysis(load_run(config + options, check=check_explanation), log=lambda message: None)
    assert result.metrics["n_examples"] == 2 and result.metrics["additivity"]["max_abs_error"] < 1e-4
    for name in (shap_file(ZERO_SHOT), shap_file(FINE_TUNED)):
        explanation = load_explanation(tmp_path / "out" / name)
        texts = json.loads((tmp_path / "out" / name).read_text())["texts"]
        for i, text in enumerate(texts):
            assert "".join(explanation[i].data) == text
            assert explanation[i].values.shape == (len(text.split()), 3)  # words, the default features
    assert result.metrics["budget"]["counts"]["coarse"] == 2  # 8 evaluations cannot split a 30-token tweet
    assert (tmp_path / "out" / EXPLANATIONS_FILE).is_file()
