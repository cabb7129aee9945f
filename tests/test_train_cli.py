"""The real `scripts/train.py` CLI, run as a user would: the embedded model end to end, secrets, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTSECRETdoNotLeak1234567890"


def run_train(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.slow
def test_embedded_fit_through_the_cli_leaves_logs_checkpoint_and_adapter(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        "fit",
        "--config",
        "configs/embedded.yaml",
        "--trainer.default_root_dir",
        str(out),
        "--data.train_subset",
        "32",
        "--data.eval_subset",
        "16",
        "--trainer.log_every_n_steps",
        "1",
        "--model.huggingface_token",
        SECRET,
        env={"HUGGINGFACE_TOKEN": SECRET},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = list((out / "lightning_logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/loss", "val/acc", "val/f1_macro", "val/mcc"} <= set(accumulator.Tags()["scalars"])
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and checkpoint.stat().st_size < 20_000_000  # LoRA weights + optimizer, no base
    adapter = out / "lora_adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    meta = yaml.safe_load((adapter / "classification.json").read_text())
    assert meta["label_names"] == ["negative", "neutral", "positive"]
    assert meta["base_model"] == "embedded:smollm2-135m-instruct"
    saved_config = yaml.safe_load(next((out / "lightning_logs").rglob("config.yaml")).read_text())
    assert saved_config["model"]["huggingface_token"] is None
    # The token reaches no file: config.yaml, hparams.yaml, TensorBoard events, checkpoint, adapter.
    assert SECRET.encode() not in all_bytes_under(out)
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.dataset_name", "embedded:nope"], "Unknown embedded dataset"),
        (["--data.text_field", "tweet"], "has no column 'tweet'; available: id, text, label, label_text"),
        (["--data.label_space", "[joy]"], "label_space values ['joy'] are not labels"),
        (["--data.prompt_style", "seed-digits"], "label word ' 0' is 2 tokens"),
        (["--model.model_name", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, args, message):
    out = tmp_path / "run"
    result = run_train("fit", "--config", "configs/embedded.yaml", "--trainer.default_root_dir", str(out), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not out.exists() or not any(out.rglob("*.ckpt"))


def test_unwritable_output_folder_is_reported(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/lora-explain-cannot-write-here"  # even root cannot create folders in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    result = run_train("fit", "--config", "configs/embedded.yaml", "--trainer.default_root_dir", target)
    assert result.returncode == 2
    assert "Cannot write to the output folder" in result.stderr and "Traceback" not in result.stderr


def test_a_loaded_run_is_freed_once_dropped(trained):
    """What a finished phase loaded goes when its result does: jsonargparse keeps the last parser in a context
    variable, and through it the CLI and the model; `load_run` (and `fit`) must not let that outlive the call, or a
    fit's model stays resident through the evaluation and an evaluation's through the explanation."""
    import gc
    import weakref

    from analysis.configuration import load_run

    run = load_run(["--config", str(trained["config"])])
    model = weakref.ref(run.module)
    del run
    gc.collect()
    assert model() is None
