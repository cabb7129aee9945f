"""DDP on CPU (gloo) through the real `scripts/train.py` CLI: the same optimisation as one process, files written once.

Two processes with per-device batch 4 and one process with batch 8 see the same global batches (the DataModule's
sampler draws one permutation per seed and epoch and deals it out by rank), start from the same LoRA init (same
seed; DDP also broadcasts rank 0's weights when it wraps the model) and average the same 8 per-example gradients.
With LoRA dropout off they are one optimisation, differing only in fp32 summation order. Measured on the 2-core
CPU: adapter weights agree to 3e-6 and val loss to 3e-7, while merely drawing another shuffle (`--data.seed 1`)
moves the weights by 0.34 and the val loss by 0.011. The 1e-4 tolerances sit 30x above the first and 100x below
the second: a real divergence (gradients not averaged, other batches, eval examples counted twice or dropped,
per-rank loss logged) fails them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_DDPTESTSECRETdoNotLeak0987654321"
# 17 eval examples: two ranks hold 9 and 8 (2 and 1 batches of 8). An odd count is where padding duplicates and
# Lightning's floored sync_dist mean (Lightning-AI/pytorch-lightning#21859) would show up.
EVAL_EXAMPLES = 17
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, model_dir: str, data_dir: str, every_n_train_steps: int | None = None) -> Path:
    checkpoint = {"save_last": True, "save_top_k": 0}
    if every_n_train_steps:
        checkpoint["every_n_train_steps"] = every_n_train_steps
    config = {
        "seed_everything": 42,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_modules.PeriodicModelCheckpoint", "init_args": checkpoint},
                {"class_path": "lightning_modules.ExportAdapter"},
            ],
        },
        "model": {
            "model_name": model_dir,
            "load_in_4bit": False,
            "lora_dropout": 0.0,  # dropout masks come from each process's RNG: with it the runs differ by noise
            "learning_rate": 0.02,
            "warmup_ratio": 0.0,
        },
        "data": {"dataset_name": data_dir, "seed": 0, "eval_subset": EVAL_EXAMPLES, "eval_batch_size": 8},
    }
    path = folder / f"ddp-{every_n_train_steps or 'epoch'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_command(config: Path, out: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), HUGGINGFACE_TOKEN=SECRET)
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(config)]
    command += ["--trainer.default_root_dir", str(out), "--model.huggingface_token", SECRET, *args]
    return command, env


def fit(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command, env = fit_command(config, out, *args)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def scalars(out: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "lightning_logs").rglob("events.out.tfevents.*")  # one run, one writer (rank 0)
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, synthetic_folder, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, tiny_model_dir, synthetic_folder)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    fit(config, single, "--data.batch_size", "8")
    result = fit(config, ddp, "--data.batch_size", "4", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert "distributed_backend=gloo" in result.stdout + result.stderr

    # Written once, by rank 0, and complete when fit returned: one adapter, one log version, one checkpoint.
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "lightning_logs", "lora_adapter"]
    assert [p.name for p in (ddp / "lightning_logs").iterdir()] == ["version_0"]
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == ["last.ckpt"]
    meta = yaml.safe_load((ddp / "lora_adapter" / "classification.json").read_text())
    assert meta["label_names"] == ["negative", "neutral", "positive"] and meta["base_model"] == tiny_model_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, ddp / "lora_adapter"))
    expected = load_file(single / "lora_adapter" / "adapter_model.safetensors")
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-4)
    # ... and the adapter trained: LoRA B starts at zero, it now lies far outside the tolerance.
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 0.05
    steps = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] for run in (single, ddp)]
    assert steps == [24, 24]  # 48 examples / global batch 8 x 4 epochs

    ours, theirs = scalars(ddp), scalars(single)
    assert set(ours) == set(theirs)
    for tag in ("val/loss", "train/loss"):  # every epoch / every step, the global mean on both
        assert ours[tag] == pytest.approx(theirs[tag], abs=1e-4), tag
    for tag in [t for t in theirs if t.startswith("val/") and t != "val/loss"]:  # acc, F1, MCC: same predictions
        assert ours[tag] == pytest.approx(theirs[tag], abs=1e-6), tag
    assert theirs["val/loss"][-1] < theirs["val/loss"][0] - 0.05  # it learned (0.14 measured), beyond tolerance

    # The hub token is used, never written: not in config.yaml, hparams, events, checkpoint, adapter, or output.
    saved = yaml.safe_load((ddp / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["huggingface_token"] is None
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in ddp.rglob("*") if p.is_file())
    assert SECRET not in result.stdout + result.stderr

    # Killed with kill -9 (both processes) after its first periodic checkpoint, the DDP fit resumes with
    # --ckpt_path last to the uninterrupted DDP adapter: each rank continues its share of the same order.
    periodic, killed = (
        write_config(tmp_path, tiny_model_dir, synthetic_folder, every_n_train_steps=2),
        tmp_path / "kill",
    )
    command, env = fit_command(periodic, killed, "--data.batch_size", "4", "--trainer.strategy", "ddp")
    command += ["--trainer.devices", "2"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = killed / "checkpoints" / "last.ckpt"
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the rank it started
    process.wait(timeout=60)
    saved = torch.load(checkpoint, weights_only=True)
    assert process.returncode == -signal.SIGKILL and 2 <= saved["global_step"] < 24
    assert len(saved["random_states"]) == 2  # one per process
    fit(
        periodic,
        killed,
        "--data.batch_size",
        "4",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--ckpt_path",
        "last",
    )
    resumed = load_file(killed / "lora_adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(ddp / "lora_adapter" / "adapter_model.safetensors")
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in uninterrupted) <= 1e-6


def test_eval_sampler_deals_every_example_once_without_padding(synthetic_folder, tiny_model_dir):
    from datamodules import TweetSentimentDataModule
    from datamodules.tweet_sentiment import _LengthSorted

    dm = TweetSentimentDataModule(
        dataset_name=synthetic_folder, tokenizer_name=tiny_model_dir, eval_subset=EVAL_EXAMPLES, seed=0
    )
    dm.setup("validate")
    single = list(_LengthSorted(dm.eval_dataset))
    shards = [list(_LengthSorted(dm.eval_dataset, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert [len(s) for s in shards] == [9, 8]
    assert sorted(shards[0] + shards[1]) == sorted(single) == list(range(EVAL_EXAMPLES))
    # More processes than examples: an idle rank would hang DDP's first forward, so it repeats one example.
    tiny = [list(_LengthSorted(dm.eval_dataset, num_replicas=20, rank=rank)) for rank in (0, 16, 19)]
    assert all(len(s) == 1 for s in tiny)


_CONVERT_CONCURRENTLY = """
import sys, time
from pathlib import Path

# Only the cache logic is under test; the shared leaf imports no torch or transformers, so both start in a blink.
import foundation.embedded_model as em

ready = Path(sys.argv[1])

def slow_convert(gguf, out_dir):
    (out_dir / "config.json").write_text("{}")
    ready.joinpath(sys.argv[2]).touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < 2 and time.time() < deadline:  # both are now mid-conversion
        time.sleep(0.05)
    (out_dir / "model.safetensors").write_bytes(sys.argv[2].encode() * 100_000)

em.embedded_gguf_path = lambda: Path("unused.gguf")
em._convert_gguf = slow_convert
print(em.embedded_model_dir())
"""


def test_two_ranks_converting_the_embedded_model_at_once_leave_one_complete_cache(tmp_path):
    """Under torchrun or SLURM every rank starts at once and may convert the GGUF file at the same time."""
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "LORA_EXPLAIN_CACHE": str(tmp_path / "cache")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT_CONCURRENTLY, str(ready), name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("rank0", "rank1")
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    assert {out.strip() for out, _ in outputs} == {str(target)}
    weights = (target / "model.safetensors").read_bytes()
    assert weights in (b"rank0" * 100_000, b"rank1" * 100_000)  # one winner, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m-instruct"]  # no staging left
