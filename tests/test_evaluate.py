"""scripts/evaluate.py as a user runs it: every output file checked against independent computations; bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tests.tiny import save_tiny_llama, synthetic_rows, tensorboard_events, write_csv, write_tiny_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"
FAKE_TOKEN = "hf_never_written_anywhere_123"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = ("zero_shot", "zero_shot_calibrated", "k_shot", "fine_tuned")
FIGURES_AND_LOGS = {
    "predictions.jsonl",
    "metrics_comparison.png",
    "confusion_matrices.png",
    "reliability_diagram.png",
    "tensorboard",
}
ZERO_SHOT_FILES = FIGURES_AND_LOGS | {"zero_shot_metrics.json"}
BASELINE_FILES = FIGURES_AND_LOGS | {f"{model}_metrics.json" for model in MODELS[:3]} | {"comparison.json"}
ALL_FILES = BASELINE_FILES | {"fine_tuned_metrics.json"}
REPORT = "report.html"  # written by the command (scripts/evaluate.py), not by `evaluate()`


def evaluate_in_process(*args: str):
    """scripts/evaluate.py's parsing and run, in this process, returning the result object."""
    from analysis.commands import EVALUATE_ALIASES
    from analysis.configuration import load_run, translate_aliases
    from analysis.evaluation.run import check_evaluation, evaluate

    arguments = translate_aliases([*args, "--trainer.enable_progress_bar", "false"], EVALUATE_ALIASES)
    return evaluate(load_run(arguments, check=check_evaluation))


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def read_predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def read_outputs(folder: Path) -> dict:
    out = {name: json.loads((folder / name).read_text()) for name in ALL_FILES if name.endswith(".json")}
    out["rows"] = read_predictions(folder)
    return out


@pytest.fixture(scope="module")
def user_run(trained) -> dict:
    """One run of the script with an adapter, as a user types it."""
    folder = trained["root"] / "report"
    done = run_script(
        "--config", str(trained["config"]), "--adapter", str(trained["adapter"]), "--output-dir", str(folder)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder, "stdout": done.stdout, **read_outputs(folder)}


@torch.no_grad()
def plain_forward_probabilities(
    model, tokenizer, texts: list[str], label_names: list[str], demonstrations=()
) -> np.ndarray:
    """Label-token softmax from one uncached, unpadded forward per prompt, logits taken at the last position."""
    from datamodules.prompts import PromptEncoder

    encoder = PromptEncoder(tokenizer, label_names, demonstrations=demonstrations)
    rows = []
    for text in texts:
        logits = model(torch.tensor([encoder.encode(text).input_ids])).logits[0, -1]
        rows.append(torch.softmax(logits[encoder.label_token_ids].double(), dim=-1).numpy())
    return np.array(rows)


def probabilities(rows: list[dict], model: str, label_names: list[str]) -> np.ndarray:
    return np.array([[row[model]["probabilities"][name] for name in label_names] for row in rows])


# ---- a full run ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_writes_every_file_and_prints_the_figure_paths(user_run):
    folder = user_run["folder"]
    assert {p.name for p in folder.iterdir()} == ALL_FILES | {REPORT}
    assert not list(folder.rglob("*.tmp"))
    printed = [Path(line.strip()) for line in user_run["stdout"].splitlines() if line.strip().endswith(".png")]
    assert printed == [
        folder / "metrics_comparison.png",
        folder / "confusion_matrices.png",
        folder / "reliability_diagram.png",
    ]
    for path in printed:
        assert path.is_absolute() and path.read_bytes().startswith(PNG_SIGNATURE)
    for path in folder.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_the_command_writes_its_page_with_every_model(user_run):
    from tests.test_report_browser import visible_text

    folder = user_run["folder"]
    last = user_run["stdout"].splitlines()[-1]
    assert last.startswith("report: ") and Path(last[8:]) == (folder / REPORT).resolve()  # printed last
    text = visible_text((folder / REPORT).read_text())
    for model in MODELS:
        metrics = user_run[f"{model}_metrics.json"]
        ci = metrics["confidence_intervals"]["accuracy"]
        assert f"{metrics['accuracy']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]" in text, model
    difference = user_run["comparison.json"]["comparisons"]["fine_tuned_vs_zero_shot"]["differences"]["accuracy"]
    assert f"{difference['difference']:.4f} [{difference['ci_low']:.4f}, {difference['ci_high']:.4f}]" in text


@pytest.mark.slow
def test_predictions_hold_the_eval_split_and_both_models(user_run, trained):
    import csv

    with open(trained["data"] / "test.csv") as handle:  # the empty tweet is dropped by the loader
        gold = [(" ".join(row["text"].split()), row["label"]) for row in csv.DictReader(handle) if row["text"].strip()]
    rows = user_run["rows"]
    assert [(row["text"], row["label"]) for row in rows] == gold
    label_names = user_run["zero_shot_metrics.json"]["label_names"]
    for row in rows:
        assert label_names[row["label_index"]] == row["label"]
        for model in MODELS:
            probs = np.array([row[model]["probabilities"][name] for name in label_names])
            assert probs.sum() == pytest.approx(1.0)
            assert row[model]["prediction"] == label_names[int(probs.argmax())]
            assert row[model]["correct"] == (row[model]["prediction"] == row["label"])
            assert 0 < row[model]["label_space_mass"] <= 1


@pytest.mark.slow
def test_zero_shot_is_the_plain_base_model_and_fine_tuned_is_the_peft_adapter(user_run, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, label_names = user_run["rows"], user_run["zero_shot_metrics.json"]["label_names"]
    texts = [row["text"] for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    base = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()
    expected_zero_shot = plain_forward_probabilities(base, tokenizer, texts, label_names)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"]), trained["adapter"])
    expected_fine_tuned = plain_forward_probabilities(tuned.eval(), tokenizer, texts, label_names)

    zero_shot = probabilities(rows, "zero_shot", label_names)
    fine_tuned = probabilities(rows, "fine_tuned", label_names)
    assert np.abs(zero_shot - expected_zero_shot).max() <= 1e-5
    assert np.abs(fine_tuned - expected_fine_tuned).max() <= 1e-5
    assert np.abs(fine_tuned - zero_shot).max() > 1e-3


@pytest.mark.slow
def test_baselines_are_the_calibrated_and_the_k_shot_base_model(user_run, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, label_names = user_run["rows"], user_run["zero_shot_metrics.json"]["label_names"]
    texts = [row["text"] for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    base = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()

    # Calibrated: the raw zero-shot row divided by the mean content-free distribution, renormalised by hand.
    content_free = plain_forward_probabilities(base, tokenizer, ["", "N/A", "[MASK]"], label_names)
    prior = content_free.mean(axis=0)
    raw = plain_forward_probabilities(base, tokenizer, texts, label_names)
    expected = (raw / prior) / (raw / prior).sum(axis=1, keepdims=True)
    assert np.abs(probabilities(rows, "zero_shot_calibrated", label_names) - expected).max() <= 1e-5
    calibration = user_run["zero_shot_calibrated_metrics.json"]["source"]["calibration"]
    np.testing.assert_allclose(calibration["prior"], prior, atol=1e-6)
    assert calibration["content_free_inputs"] == ["", "N/A", "[MASK]"]

    # k-shot: 4 demonstrations from the train split in the prompt, read with the adapter disabled.
    source = user_run["k_shot_metrics.json"]["source"]
    shots = [(shot["text"], shot["label"]) for shot in source["demonstrations"]]
    assert len(shots) == 4 and not source["adapter_enabled"] and source["display_name"] == "4-shot"
    assert not {" ".join(text.split()) for text, _ in shots} & set(texts)
    expected = plain_forward_probabilities(base, tokenizer, texts, label_names, demonstrations=shots)
    assert np.abs(probabilities(rows, "k_shot", label_names) - expected).max() <= 1e-5
    assert source["prompt"]["num_demonstrations"] == 4 and "Tweet: " + shots[0][0] in source["prompt"]["instruction"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_metrics_files_agree_with_the_predictions(user_run, trained, model):
    rows, metrics = user_run["rows"], user_run[f"{model}_metrics.json"]
    label_names = metrics["label_names"]
    gold = np.array([row["label_index"] for row in rows])
    predicted = np.array([row[model]["prediction_index"] for row in rows])
    probs = probabilities(rows, model, label_names)
    assert metrics["n_examples"] == len(rows) == 24
    assert metrics["accuracy"] == pytest.approx(np.mean(gold == predicted), abs=1e-6)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (gold, predicted), 1)
    assert metrics["confusion_matrix"] == confusion.tolist()
    for k, name in enumerate(label_names):
        stats = metrics["per_class"][name]
        assert stats["support"] == int(np.sum(gold == k))
        if confusion[k].sum():
            assert stats["recall"] == pytest.approx(confusion[k, k] / confusion[k].sum(), abs=1e-6)
    assert metrics["mean_max_probability"] == pytest.approx(probs.max(1).mean(), abs=1e-6)
    assert metrics["label_space_mass"] == pytest.approx(np.mean([row[model]["label_space_mass"] for row in rows]))
    assert metrics["format_compliance"] == pytest.approx(np.mean([row[model]["top_token_is_label"] for row in rows]))
    for key in ("precision", "recall", "f1", "macro_f1", "macro_recall", "mcc", "ece"):
        assert isinstance(metrics[key], float)
    for name in ("accuracy", "macro_f1"):
        ci = metrics["confidence_intervals"][name]
        assert ci["n_resamples"] >= 1000 and ci["confidence"] == 0.95
        assert ci["low"] <= metrics[name] + 1e-9 and metrics[name] - 1e-9 <= ci["high"]
    source = metrics["source"]
    assert source["model"] == model and source["base_model"] == trained["model"]
    assert source["adapter_enabled"] == (model == "fine_tuned")
    assert source["config"] == str(trained["config"])
    assert source["adapter"] == (str(trained["adapter"]) if model == "fine_tuned" else None)
    assert source["prompt"]["label_names"] == label_names and source["prompt"]["instruction"]


@pytest.mark.slow
def test_comparison_pairs_every_baseline_with_the_fine_tuned_model(user_run):
    from scipy.stats import binomtest

    rows, comparison = user_run["rows"], user_run["comparison.json"]
    assert comparison["reference"] == "fine_tuned"
    assert list(comparison["comparisons"]) == [f"fine_tuned_vs_{model}" for model in MODELS[:3]]
    fine_tuned = np.array([row["fine_tuned"]["correct"] for row in rows])
    p_values = []
    for baseline in MODELS[:3]:
        pair = comparison["comparisons"][f"fine_tuned_vs_{baseline}"]
        assert (pair["baseline"], pair["model"]) == (baseline, "fine_tuned")
        correct = np.array([row[baseline]["correct"] for row in rows])
        accuracy = pair["differences"]["accuracy"]
        assert accuracy["difference"] == pytest.approx(fine_tuned.mean() - correct.mean(), abs=1e-6)
        assert accuracy["ci_low"] <= accuracy["difference"] + 1e-9 <= accuracy["ci_high"] + 2e-9
        assert accuracy["baseline_value"] == pytest.approx(user_run[f"{baseline}_metrics.json"]["accuracy"])
        mcnemar = pair["mcnemar"]
        b, c = int(np.sum(correct & ~fine_tuned)), int(np.sum(~correct & fine_tuned))
        assert (mcnemar["b_only_first_correct"], mcnemar["c_only_second_correct"]) == (b, c)
        expected_p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert mcnemar["p_value"] == pytest.approx(expected_p)
        p_values.append(mcnemar["p_value"])
    # Holm by hand: sort ascending, multiply the i-th (0-based) by 3 - i, running maximum, cap at 1.
    order = np.argsort(p_values, kind="stable")
    running, holm = 0.0, [0.0] * 3
    for rank, i in enumerate(order):
        running = max(running, min(1.0, p_values[i] * (3 - rank)))
        holm[i] = running
    adjusted = [comparison["comparisons"][f"fine_tuned_vs_{m}"]["mcnemar"]["p_value_holm"] for m in MODELS[:3]]
    assert adjusted == pytest.approx(holm)
    assert comparison["n_resamples"] >= 1000
    assert comparison["source"]["adapter"] == user_run["fine_tuned_metrics.json"]["source"]["adapter"]
    assert comparison["display_names"]["k_shot"] == "4-shot"


@pytest.mark.slow
def test_headline_metrics_are_in_tensorboard(user_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(user_run["folder"] / "tensorboard"))
    events.Reload()
    for model in MODELS:
        for name in ("accuracy", "macro_f1", "ece", "label_space_mass"):
            (scalar,) = events.Scalars(f"{model}/{name}")
            assert scalar.value == pytest.approx(user_run[f"{model}_metrics.json"][name], abs=1e-6)
    pair = user_run["comparison.json"]["comparisons"]["fine_tuned_vs_k_shot"]
    (difference,) = events.Scalars("fine_tuned_vs_k_shot/accuracy_difference")
    assert difference.value == pytest.approx(pair["differences"]["accuracy"]["difference"])
    events = tensorboard_events(user_run["folder"] / "tensorboard")
    for figure in ("confusion_matrices", "metrics_comparison", "reliability_diagram"):
        (image,) = events.Images(f"evaluation/{figure}")
        png = (user_run["folder"] / f"{figure}.png").read_bytes()
        assert image.encoded_image_string == png  # the figure the folder holds, byte for byte
        decoded = PIL.Image.open(io.BytesIO(png))
        assert (image.width, image.height) == decoded.size


@pytest.mark.slow
def test_a_lightning_checkpoint_gives_the_same_fine_tuned_model(user_run, trained, tmp_path):
    result = evaluate_in_process(
        "--config",
        str(trained["config"]),
        "--output-dir",
        str(tmp_path / "ckpt"),
        "--adapter",
        str(trained["checkpoint"]),
        "--baselines",
        "zero_shot",
    )
    label_names = result.metrics["zero_shot"]["label_names"]
    rows = read_predictions(tmp_path / "ckpt")
    for model in ("zero_shot", "fine_tuned"):
        np.testing.assert_allclose(
            probabilities(rows, model, label_names), probabilities(user_run["rows"], model, label_names), atol=1e-6
        )


def test_without_adapter_the_baselines_are_compared_with_raw_zero_shot(trained, tmp_path):
    folder = tmp_path / "baselines"
    folder.mkdir()
    # An earlier run with an adapter left this: it must not sit next to a run without one.
    (folder / "fine_tuned_metrics.json").write_text("{}")
    result = evaluate_in_process("--config", str(trained["config"]), "--output-dir", str(folder), "--eval-subset", "9")
    assert {p.name for p in folder.iterdir()} == BASELINE_FILES
    assert list(result.metrics) == list(MODELS[:3])
    assert result.comparison["reference"] == "zero_shot"
    assert list(result.comparison["comparisons"]) == ["zero_shot_vs_zero_shot_calibrated", "zero_shot_vs_k_shot"]
    rows = read_predictions(folder)
    assert len(rows) == 9 and all("fine_tuned" not in row for row in rows)

    # Raw zero-shot alone: nothing to compare, and the other models' files from the run above are removed.
    result = evaluate_in_process(
        "--config",
        str(trained["config"]),
        "--output-dir",
        str(folder),
        "--eval-subset",
        "9",
        "--baselines",
        "zero_shot",
    )
    assert {p.name for p in folder.iterdir()} == ZERO_SHOT_FILES
    assert result.comparison is None and set(result.metrics) == {"zero_shot"}


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(trained, tmp_path_factory) -> dict:
    """One broken input per case; each maps to evaluate.py arguments (before --output-dir)."""
    import shutil

    root = tmp_path_factory.mktemp("bad")
    config, adapter, model = str(trained["config"]), trained["adapter"], trained["model"]
    other_model = save_tiny_llama(root / "other-llama", seed=1)
    corrupt = shutil.copytree(adapter, root / "corrupt_adapter")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bad_meta = shutil.copytree(adapter, root / "bad_meta")
    (bad_meta / "classification.json").write_text("{not json")
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint")
    (root / "a_file").write_text("")
    no_positive = root / "no_positive"
    no_positive.mkdir()
    write_csv(no_positive / "train.csv", synthetic_rows(12, seed=3))
    write_csv(no_positive / "test.csv", [row for row in synthetic_rows(12, seed=4) if row[1] != "positive"])
    neutral_eval = root / "neutral_eval"  # no eval tweet of either class kept
    neutral_eval.mkdir()
    write_csv(neutral_eval / "train.csv", synthetic_rows(12, seed=3))
    write_csv(neutral_eval / "test.csv", [row for row in synthetic_rows(12, seed=4) if row[1] == "neutral"])

    def cfg(name: str, model_name: str = model, data_root: str = str(trained["data"]), **data) -> str:
        return str(write_tiny_config(root / f"{name}.yaml", model_name, data_root, root / "train", **data))

    return {
        "missing config": (["--config", str(root / "missing.yaml")], "does not exist"),
        "missing adapter": (["--config", config, "--adapter", str(root / "nope")], "does not exist"),
        "corrupt adapter": (["--config", config, "--adapter", str(corrupt)], "is corrupt"),
        "corrupt adapter metadata": (["--config", config, "--adapter", str(bad_meta)], "is corrupt"),
        "corrupt checkpoint": (["--config", config, "--adapter", str(root / "garbage.ckpt")], "missing or corrupt"),
        "adapter of another base model": (
            ["--config", cfg("other_base", model_name=str(other_model)), "--adapter", str(adapter)],
            "was trained on",
        ),
        "label space differs": (
            ["--config", cfg("two_labels", label_space=["negative", "positive"]), "--adapter", str(adapter)],
            "trained on labels",
        ),
        "prompt differs": (
            ["--config", cfg("digits", prompt_style="seed-digits"), "--adapter", str(adapter)],
            "prompt_style",
        ),
        "eval split empty after label filtering": (
            ["--config", cfg("empty_eval", data_root=str(neutral_eval), label_space=["negative", "positive"])],
            "no rows left",
        ),
        "output folder under a file": (["--config", config, "--output-dir", str(root / "a_file" / "out")], "is a file"),
        "k-shot baseline without demonstrations": (["--config", config, "--k-shot", "0"], "at least one demonstration"),
        "more demonstrations than training rows": (["--config", config, "--k-shot", "300"], "Cannot draw"),
    }


CASES = [
    "missing config",
    "missing adapter",
    "corrupt adapter",
    "corrupt adapter metadata",
    "corrupt checkpoint",
    "adapter of another base model",
    "label space differs",
    "prompt differs",
    "eval split empty after label filtering",
    "output folder under a file",
    "k-shot baseline without demonstrations",
    "more demonstrations than training rows",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(bad_inputs, case, tmp_path, capsys):
    from analysis.commands import evaluate_main as main

    args, expected = bad_inputs[case]
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("earlier results")
    if "--output-dir" not in args:
        args = [*args, "--output-dir", str(folder)]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_bad_input_as_a_user_sees_it_has_no_traceback(bad_inputs, tmp_path):
    args, expected = bad_inputs["adapter of another base model"]
    folder = tmp_path / "never-created"
    done = run_script(*args, "--output-dir", str(folder))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    assert "Traceback" not in done.stderr and sum(line.startswith("error:") for line in done.stderr.splitlines()) == 1
    assert not folder.exists()


# ---- the embedded model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_zero_shot_run_matches_a_plain_forward(embedded_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "embedded"
    done = run_script(
        "--config", str(REPO / "configs" / "embedded.yaml"), "--eval-subset", "6", "--output-dir", str(folder)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in folder.iterdir()} == BASELINE_FILES | {REPORT}
    metrics = json.loads((folder / "zero_shot_metrics.json").read_text())
    rows = read_predictions(folder)
    assert metrics["n_examples"] == len(rows) == 6
    assert metrics["source"]["base_model"] == "embedded:smollm2-135m-instruct"
    label_names = metrics["label_names"]
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir).eval()
    expected = plain_forward_probabilities(
        model, AutoTokenizer.from_pretrained(embedded_model_dir), [row["text"] for row in rows], label_names
    )
    assert np.abs(probabilities(rows, "zero_shot", label_names) - expected).max() <= 1e-4
