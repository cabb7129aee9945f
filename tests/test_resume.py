"""Fault tolerance: a fit killed with `kill -9` resumes exactly; a killed one-command run continues where it stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny import synthetic_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"


def resumable_config(folder: Path, model_dir: str, data_dir: Path) -> Path:
    """The tiny model with LoRA dropout on (the RNG matters), accumulation, and last.ckpt every 2 optimizer steps."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "accumulate_grad_batches": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning_modules.PeriodicModelCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 2},
                },
                {"class_path": "lightning_modules.ExportAdapter"},
            ],
        },
        "model": {"model_name": model_dir, "load_in_4bit": False, "learning_rate": 0.02, "lora_dropout": 0.3},
        "data": {"dataset_name": str(data_dir), "batch_size": 4, "eval_batch_size": 6, "seed": 0},
    }
    path = folder / "resumable.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("resumable")
    data = folder / "data"
    data.mkdir()
    write_csv(data / "train.csv", synthetic_rows(160, seed=1))  # 40 batches, 20 optimizer steps
    write_csv(data / "test.csv", synthetic_rows(12, seed=2))
    return resumable_config(folder, tiny_model_dir, data)


def fit_command(config: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(TRAIN), "fit", "--config", str(config), "--trainer.default_root_dir", str(out), *args]


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "lora_adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_fit_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(resumable, tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run(fit_command(resumable, whole), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 20  # written when fit ends too, not only at the 2-step trigger

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        fit_command(resumable, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the fit ended before it could be killed"
    saved = torch.load(checkpoint, weights_only=True)  # complete: it is written beside the target and renamed
    assert 2 <= saved["global_step"] < 20 and not (killed / "lora_adapter").exists()
    assert saved["TweetSentimentDataModule"]["train_order"]["batches"] == 2 * saved["global_step"]

    resumed = subprocess.run(
        fit_command(resumable, killed, "--ckpt_path", "last"), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    expected, got = adapter_weights(whole), adapter_weights(killed)
    assert expected.keys() == got.keys()
    # Same process kind and thread count: equal to float rounding; another batch, shuffle or dropout mask
    # after the resume moves these weights by more than 0.1 (measured).
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


# ---- the one command ------------------------------------------------------------------------------------------
EXPERIMENT = ROOT / "scripts" / "run_experiment.py"


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """320 training tweets: 20 optimizer steps of the original recipe (batch 4 x accumulation 4), so the periodic
    checkpoint (every 10 steps) is written half-way through the fit."""
    folder = tmp_path_factory.mktemp("long")
    write_csv(folder / "train.csv", synthetic_rows(320, seed=1))
    write_csv(folder / "test.csv", synthetic_rows(12, seed=2))
    return folder


def experiment_flags(model_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--model-name", model_dir, "--dataset-name", str(data), "--no-load-in-4bit", "--finetune"),
        *("--train-subset", "None", "--baselines", "zero_shot", "--shap-example-count", "1"),
        *("--no-project-badge", "--output-dir", str(out), *extra),
    ]


def modified_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_one_command_resumes_a_killed_run_and_redoes_nothing_finished(tmp_path, tiny_model_dir, long_data, capsys):
    from analysis.commands import experiment_main

    out = tmp_path / "run"
    flags = experiment_flags(tiny_model_dir, long_data, out)
    checkpoint = out / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, str(EXPERIMENT), *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed = json.loads((out / "run.json").read_text())
    assert killed["status"] == "running" and killed["phases_done"] == []  # kill -9: nothing could record it
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 10

    # The same command continues: the fit from its checkpoint (step 10 of 20), then the rest.
    assert experiment_main(flags) == 0
    printed = capsys.readouterr()
    assert f"resuming the run in {out}" in printed.out
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and [a["status"] for a in manifest["attempts"]] == ["running", "complete"]
    assert manifest["phases_done"] == ["train", "evaluate", "explain"]
    resumed_from = torch.load(checkpoint, weights_only=True)
    assert resumed_from["global_step"] == 20
    events = sorted((out / "lightning_logs").glob("version_*/events.out.tfevents.*"))
    assert len(events) == 2  # the killed fit's log and the resumed one's

    # Again: everything is finished, nothing is redone, the summary is the same.
    before = modified_times(out)
    assert experiment_main(flags) == 0
    again = capsys.readouterr().out
    after = modified_times(out)
    unchanged = {name for name in before if before[name] == after.get(name)}
    assert {"lora_adapter/adapter_model.safetensors", "fine_tuned_metrics.json", "fine_tuned_shap.json"} <= unchanged
    assert "== fine-tuning a LoRA adapter (scripts/train.py fit) (finished before: kept) ==" in again
    assert "== explaining with SHAP (finished before: kept) ==" in again
    summary = [line for line in printed.out.splitlines() if line.startswith("fine_tuned") or "accuracy" in line]
    assert summary and all(line in again for line in summary)

    # Other options are refused before anything is touched; --overwrite starts over.
    snapshot = {name: (out / name).read_bytes() for name in before}
    assert experiment_main([*flags, "--eval-subset", "6"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--eval-subset 1000 there, 6 here" in error[0] and "--overwrite" in error[0]
    assert {name: (out / name).read_bytes() for name in before} == snapshot
    zero_shot_only = ["--no-finetune", "--no-run-shap", "--overwrite"]
    assert experiment_main([*flags, *zero_shot_only]) == 0
    fresh = json.loads((out / "run.json").read_text())
    assert len(fresh["attempts"]) == 1 and fresh["phases_done"] == ["evaluate"]
    assert not (out / "lora_adapter").exists() and not (out / "checkpoints").exists()
    assert not (out / "fine_tuned_shap.json").exists()


def test_a_run_of_an_older_version_resumes_when_its_new_options_are_at_their_defaults(tmp_path):
    from analysis.provenance.experiment import ExperimentOptions, previous_run, recorded_options, run_config
    from foundation.errors import UserInputError

    options = ExperimentOptions(output_dir=str(tmp_path))
    now, config = recorded_options(options, []), run_config(options, tmp_path)
    older_options = {k: v for k, v in now.items() if k != "explainers"}  # written before --explainers existed
    older_config = json.loads(json.dumps(config))
    del older_config["explain"]["explainers"]
    manifest = {"options": older_options, "config": older_config, "phases_done": ["train"]}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    assert previous_run(tmp_path, now, config)["phases_done"] == ["train"]

    older_config["explain"]["max_evals_cap"] = 256  # a default that changed: not the same computation
    (tmp_path / "run.json").write_text(json.dumps({**manifest, "config": older_config}))
    with pytest.raises(UserInputError, match=r"explain\.max_evals_cap changed in the project"):
        previous_run(tmp_path, now, config)
    (tmp_path / "run.json").write_text("{ half a file")
    with pytest.raises(UserInputError, match="cannot be read"):
        previous_run(tmp_path, now, config)


@pytest.mark.slow
def test_the_command_line_continues_after_its_fit_in_a_fresh_process_and_keeps_the_fit(
    tmp_path, tiny_model_dir, synthetic_folder
):
    """The command line fits, records the fit, and continues as a fresh image of itself (same process id), which
    evaluates and explains that fit: even under --overwrite, the fresh image never starts the run over."""
    out = tmp_path / "run"
    flags = experiment_flags(tiny_model_dir, Path(synthetic_folder), out, "--overwrite", "--no-run-shap")
    done = subprocess.run(
        [sys.executable, str(EXPERIMENT), *flags], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("== fine-tuning a LoRA adapter") == 1
    assert done.stdout.count("== continuing in a fresh process") == 1
    assert "resuming" not in done.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["phases_done"] == ["train", "evaluate"]
    first, second = manifest["attempts"]
    assert (first["status"], second["status"]) == ("continued in a fresh process", "complete")
    assert first["pid"] == second["pid"]
    assert len(list((out / "lightning_logs").glob("version_*"))) == 1  # one fit, not two
    evaluated = json.loads((out / "fine_tuned_metrics.json").read_text())
    assert evaluated["n_examples"] == 24
    assert set(manifest["phase_seconds"]) >= {"train", "evaluate", "total"}
