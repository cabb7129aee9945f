"""bf16 fit (fp32 LoRA weights, gradients and optimizer state), half-precision attention, and `dtype: auto`."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml

from lightning_modules.precision import choose_dtype, find_record, hardware_kind, native_bf16, record_gates
from tests.test_train_cli import run_train
from tests.test_training import make_pair, trainer
from tests.tiny import write_tiny_config


def _record(model: str, fit: bool = True) -> dict:
    gate = {"passes": True, "summary": "hand-made record"}
    return {
        "model": model,
        "hardware": hardware_kind(),
        "torch": torch.__version__,
        "measured": "2026-12-02",
        "gates": {"fit": {"passes": fit, "summary": "val loss differs by 0.5"}, "evaluation": gate, "explain": gate},
    }


def test_auto_picks_bf16_only_where_native_and_the_recorded_gate_passes():
    native = native_bf16(hardware_kind())
    records = [_record("m", fit=False)]
    assert choose_dtype("float32", "m", "fit", records).dtype == "float32"
    requested = choose_dtype("bfloat16", "m", "fit", records)
    assert requested.dtype == "bfloat16" and requested.reason.startswith("requested with --model.dtype")
    # where bf16 is only emulated the user is told (a warning: it runs, many times slower than fp32)
    assert requested.emulated == (not native) and ("emulates" in requested.reason) == (not native)
    for phase in ("evaluation", "explain"):
        choice = choose_dtype("auto", "m", phase, records)
        assert choice.dtype == ("bfloat16" if native else "float32"), choice
        assert ("gate passed" in choice.reason) == native
    failed = choose_dtype("auto", "m", "fit", records)
    assert failed.dtype == "float32" and ("gate failed" in failed.reason or not native), failed
    other = choose_dtype("auto", "another model", "evaluation", records)
    assert other.dtype == "float32" and ("no bf16 gates are recorded" in other.reason or not native)
    with pytest.raises(ValueError):
        choose_dtype("auto", "m", "training", records)


def test_recording_replaces_the_same_model_hardware_and_torch(tmp_path):
    path = tmp_path / "gates.json"
    record_gates(_record("m"), path)
    record_gates(_record("other"), path)
    record_gates({**_record("m"), "measured": "later"}, path)
    records = json.loads(path.read_text())["records"]
    assert [r["model"] for r in records] == ["other", "m"]
    assert find_record(records, "m", hardware_kind())["measured"] == "later"


def test_bf16_fit_trains_fp32_lora_weights_on_a_bf16_base(synthetic_folder, tiny_model_dir, tmp_path):
    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir, dtype="bfloat16")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    frozen = [p for p in module.backbone.parameters() if not p.requires_grad]
    lora = [p for p in module.backbone.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert {p.dtype for p in frozen if p.dim() == 2} == {torch.bfloat16}

    # The bf16 label loss is the fp32 one within bf16 rounding: the same LoRA weights on an fp32 copy of the base.
    _, reference = make_pair(synthetic_folder, tiny_model_dir, dtype="float32")
    reference.backbone.load_state_dict(module.backbone.state_dict(), strict=False)
    module.eval(), reference.eval()
    with torch.no_grad():
        bf16_loss, fp32_loss = module._step(batch)[0].item(), reference._step(batch)[0].item()
    assert abs(bf16_loss - fp32_loss) < 0.02 * max(1.0, fp32_loss), (bf16_loss, fp32_loss)

    fit = trainer(tmp_path, max_epochs=6, enable_checkpointing=False)
    fit.fit(module, dm)
    optimizer = fit.optimizers[0]
    state = [optimizer.state[p] for p in lora]
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in state)
    module.eval()
    with torch.no_grad():
        after = module._step(batch)[0].item()
    assert after < bf16_loss - 0.3, (bf16_loss, after)
    module.train()
    module._step(batch)[0].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


def test_half_precision_attention_on_a_cpu_matches_an_fp32_forward(tiny_model_dir):
    from lightning_modules.backbone import load_causal_lm
    from lightning_modules.tree_attention import HALF_SDPA

    model = load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype="bfloat16").eval()
    assert model.config._attn_implementation == HALF_SDPA
    reference = load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype="float32").eval()
    assert reference.config._attn_implementation == "sdpa"  # the fp32 path is untouched
    ids = torch.tensor([[5, 9, 13, 2, 7, 11], [4, 6, 8, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        half = model(input_ids=ids, attention_mask=mask).logits.float()
        full = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    scale = full[real].abs().max()
    assert (half[real] - full[real]).abs().max() < 0.05 * scale  # bf16 weights: ~3 significant digits


def test_the_cli_resolves_auto_from_the_recorded_gates(tmp_path, tiny_model_dir, synthetic_folder):
    gates = tmp_path / "gates.json"
    record_gates(_record(tiny_model_dir, fit=True), gates)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, synthetic_folder, tmp_path / "run")
    result = run_train(
        "fit", "--config", str(config), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        env={"LORA_EXPLAIN_DTYPE_GATES": str(gates)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = next((tmp_path / "run" / "lightning_logs").glob("version_*/config.yaml"))
    dtype = yaml.safe_load(saved.read_text())["model"]["dtype"]
    assert dtype == ("bfloat16" if native_bf16(hardware_kind()) else "float32")


@pytest.mark.parametrize(
    ("weights", "precision", "record"),
    [
        ("float32", "bf16-mixed", {"computes_in": "bfloat16", "trainer_precision": "bf16-mixed"}),
        ("float32", "16-mixed", {"computes_in": "float16", "trainer_precision": "16-mixed"}),
        ("float32", "bf16-true", {"computes_in": "bfloat16", "trainer_precision": "bf16-true"}),
        ("float32", "32-true", {}),
        ("bfloat16", None, {}),
    ],
)
def test_the_recorded_fit_dtype_is_what_the_products_ran_in(weights, precision, record):
    """A fit of fp32 weights under --trainer.precision bf16-mixed (the Llama config on a GPU) multiplies in bf16: the
    record run.json keeps says so beside the weights' dtype; a precision that changes nothing adds nothing."""
    chosen = choose_dtype(weights, "any-model", "fit")
    expected = {"dtype": weights, "reason": chosen.reason, "requested": weights, **record}
    assert chosen.under_precision(precision).as_dict() == expected


def test_a_mixed_precision_fit_says_its_products_run_in_bf16(tmp_path, tiny_model_dir, synthetic_folder):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, synthetic_folder, tmp_path / "run")
    result = run_train(
        "fit", "--config", str(config), "--model.dtype", "float32", "--trainer.precision", "bf16-mixed",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "fit computes in bfloat16 (float32 weights, autocast by --trainer.precision bf16-mixed)" in log
    assert "fit computes in float32:" not in log
