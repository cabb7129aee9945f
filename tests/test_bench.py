"""The benchmark's accounting (FLOPs from positions run, peak memory), gates and combined table, on a tiny Llama."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bench.accounting import Work, WorkCounter, layer_matmul_gflops, matmul_peak_gflops, run_with_usage
from bench.bench_all import (
    format_table,
    json_row,
    policy_record,
    prediction_agreement,
    shap_correlation,
    table_rows,
)
from bench.gate_dtypes import evaluation_gate, explain_gate, fit_gate
from foundation.memory import PeakMemory


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_counter_counts_positions_keys_and_head_positions(tiny_llama):
    from transformers import DynamicCache

    counter = WorkCounter(tiny_llama)
    with counter, torch.no_grad():
        tiny_llama(input_ids=torch.ones(2, 5, dtype=torch.long))  # logits at all 10 positions
        cache = DynamicCache()
        tiny_llama.model(input_ids=torch.ones(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)
        tiny_llama.model(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=cache, use_cache=True)
    tiny_llama(input_ids=torch.ones(1, 4, dtype=torch.long))  # after exit: not counted
    # 2 rows x 5 (triangle 15 keys each); 3 (triangle 6); 2 on a 3-token cache (3 + 1, 3 + 2 keys).
    assert counter.work == Work(positions=10 + 3 + 2, keys=2 * 15 + 6 + 9, head_positions=10)


def test_forward_flops_follow_the_documented_formula(tiny_llama):
    counter = WorkCounter(tiny_llama)
    # Per layer: q 16x16, k 16x8, v 16x8, o 16x16, MLP 3 x 16x32, two norms of 16; plus the final norm.
    body = 2 * (256 + 128 + 128 + 256 + 3 * 512 + 32) + 16
    assert counter.body_params == body
    assert counter.head_params == 50 * 16
    work = Work(positions=7, keys=20, head_positions=3)
    linear = 2 * body * 7 + 2 * 800 * 3
    attention = 4 * 2 * 16 * 20
    assert counter.forward_flops(work) == linear + attention
    # Frozen base: activation gradients only (1x) for weights, both inputs (2x) for the attention products.
    assert counter.fit_flops(work) == 2 * linear + 3 * attention


def test_fewest_flops_read_the_last_layer_at_the_ends_only(tiny_llama):
    """Every layer at every position, but the last layer's q, o, MLP and norms only at the ends (its k and v
    everywhere), plus the label rows of the head at the ends; with LoRA, its weights go with their projection."""
    from peft import LoraConfig, get_peft_model

    counter = WorkCounter(tiny_llama)
    layer = 256 + 128 + 128 + 256 + 3 * 512 + 32  # q, k, v, o, MLP, two norms
    assert counter.last_layer_params == {"all": layer, "keys_values": 128 + 128}
    every_position = 2 * layer + 16 - layer + 256  # both layers and the final norm, less the last layer's reads
    at_ends = layer - 256 + 3 * 16  # the last layer's reads and 3 label rows of the 16-wide head
    assert counter.fewest_linear_flops(positions=7, ends=2, head_rows=3) == 2 * (every_position * 7 + at_ends * 2)
    assert counter.fewest_linear_flops(7, 7, 3) < counter.linear_flops(Work(positions=7, head_positions=7))
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        active = WorkCounter(peft_model, lora_active=True)
        # r = 2: q's A 2x16 and B 16x2 (64), v's A 2x16 and B 8x2 (48)
        assert active.last_layer_params == {"all": layer + 64 + 48, "keys_values": 256 + 48}
        assert WorkCounter(peft_model).last_layer_params == {"all": layer, "keys_values": 256}
    finally:
        peft_model.unload()


def test_layer_rate_counts_the_layers_own_products(tiny_llama, monkeypatch):
    """With a clock that advances 0.5 ms per reading, each row count runs its products once between two readings
    and is timed over the next two: 2 x (q, k, v, o and the MLP's weights, no norm) x rows / 1 ms, best at 8 rows."""
    import bench.accounting as accounting

    readings = iter(range(1000))
    monkeypatch.setattr(accounting.time, "perf_counter", lambda: next(readings) * 5e-4)
    rate = layer_matmul_gflops(tiny_llama.model.layers[-1], torch.float32, rows=(4, 8), seconds=1e-4)
    assert rate == pytest.approx(2 * (256 + 128 + 128 + 256 + 3 * 512) * 8 / 1e-3 / 1e9)


def test_counter_counts_only_active_lora_and_what_a_4d_mask_allows(tiny_llama):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert WorkCounter(peft_model, lora_active=True).lora_params == lora
        assert WorkCounter(peft_model, lora_active=False).lora_params == 0
        counter = WorkCounter(peft_model)
        mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))
        mask[3, :3] = torch.tensor([True, False, False])  # a prefix tree: node 3 sees the root only
        with counter, torch.no_grad():
            counter.decoder(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=mask[None, None])
        assert counter.work.keys == int(mask.sum())
    finally:
        peft_model.unload()


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] = 2.0
    assert memory.gib >= 64 / 1024
    del block


def test_matmul_peak_is_flops_per_second_of_the_timed_loops(monkeypatch):
    """With a clock that advances 0.5 ms per reading, the rate follows by hand from 2 n^3 flops per product."""
    import bench.accounting as accounting

    readings = iter(range(1000))
    monkeypatch.setattr(accounting.time, "perf_counter", lambda: next(readings) * 5e-4)
    # Warm-up: 2 products between two readings -> 0.25 ms each -> 0.01 s / 0.25 ms = 40 products per timed loop,
    # whose two readings are again 0.5 ms apart: 40 x 2 x 64^3 flops / 0.5 ms = 41.94 GFLOP/s.
    rate = matmul_peak_gflops(torch.float32, size=64, trials=3, seconds=0.01)
    assert rate == pytest.approx(40 * 2 * 64**3 / 5e-4 / 1e9)


def test_gates_compare_predictions_and_target_class_values():
    fp32 = {"gate": {"probabilities": [[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]}}
    bf16 = {"gate": {"probabilities": [[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]]}}
    gate = prediction_agreement(fp32, bf16)
    assert gate["examples"] == 3 and gate["agreement"] == pytest.approx(2 / 3) and not gate["passes"]
    # Target = the fp32 prediction: class 1 for the first tweet, class 0 for the second.
    fp32 = {
        "tweets": [
            {"probabilities": [0.2, 0.8], "values": [[9, 1], [9, 2]]},
            {"probabilities": [0.9, 0.1], "values": [[3, 0]]},
        ]
    }
    bf16 = {
        "tweets": [
            {"probabilities": [0.3, 0.7], "values": [[0, 2], [0, 4]]},
            {"probabilities": [0.8, 0.2], "values": [[6, 9]]},
        ]
    }
    gate = shap_correlation(fp32, bf16)
    assert gate["values"] == 3 and gate["pearson_r"] == pytest.approx(1.0) and gate["passes"]


def _row(path, rate, seconds, flops, **extra):
    return {"path": path, "examples": 8, "rate": rate, "seconds": seconds, "flops": flops, "peak_rss_gib": 1.0, **extra}


def test_table_speed_ups_targets_and_peak_shares():
    results = {
        "fit": {
            "rows": [_row("ours", 5.0, 1.0, 10e9, dtype="float32"), _row("original", 0.5, 1.0, 1e9, dtype="float32")],
            "target": 10.0,
            "same_first_loss": True,
        },
        "shap": {  # seconds per explained tweet: lower is better
            "rows": [_row("ours", 2.0, 4.0, 300e9, dtype="float32"), _row("original", 8.0, 16.0, 1e9)],
            "target": 5.0,
        },
    }
    rows = table_rows(results, {"float32": 100.0, "bfloat16": 400.0})
    fit_ours, _, shap_ours, _ = rows
    assert fit_ours["speed_up"] == pytest.approx(10.0) and fit_ours["gflops"] == pytest.approx(10.0)
    assert shap_ours["speed_up"] == pytest.approx(4.0) and shap_ours["peak_share"] == pytest.approx(0.75)
    lines = format_table(rows)
    assert len(lines) == 2 + 4
    assert "| yes" in lines[2] and "**no**" in lines[4]  # fit 10x meets >= 10x; SHAP 4x misses >= 5x
    assert "1.00x (base)" in lines[3] and "1.00x (base)" in lines[5]


def test_json_rows_keep_every_figure_of_the_table():
    results = {
        "fit": {
            "rows": [_row("ours", 6.0, 1.0, 80e9, dtype="float32"), _row("original", 0.5, 1.0, 50e9, dtype="float32")],
            "target": 30.0,
            "same_first_loss": True,
        },
        "fit_bf16": {"rows": [_row("ours", 9.0, 1.0, 200e9, dtype="bfloat16")]},
    }
    rows = [json_row(row) for row in table_rows(results, {"float32": 100.0, "bfloat16": 400.0})]
    assert [(r["path"], r["dtype"]) for r in rows] == [
        ("ours", "float32"),
        ("ours", "bfloat16"),
        ("original: pad to 512, logits everywhere", "float32"),
    ]
    bf16 = rows[1]
    assert bf16["speed_up"] == pytest.approx(18.0)  # over the fp32 original
    assert bf16["percent_of_peak"] == pytest.approx(50.0) and bf16["peak_gib"] == 1.0
    assert rows[2]["speed_up"] == 1.0
    assert {"phase", "path", "dtype", "rate", "speed_up", "percent_of_peak", "peak_gib"} <= set(bf16)


def _ci(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high}


def test_fit_gate_needs_both_metrics_inside_the_cis_and_close_losses():
    fp32 = {"accuracy": _ci(0.60, 0.55, 0.65), "macro_f1": _ci(0.56, 0.51, 0.61), "val_loss": 0.950}
    inside = {"accuracy": _ci(0.58, 0.0, 1.0), "macro_f1": _ci(0.52, 0.0, 1.0), "val_loss": 0.965}
    assert fit_gate(fp32, inside)["passes"]
    assert not fit_gate(fp32, {**inside, "val_loss": 0.975})["passes"]  # |diff| 0.025
    outside = fit_gate(fp32, {**inside, "macro_f1": _ci(0.50, 0.0, 1.0)})
    assert not outside["passes"] and outside["inside_ci"] == {"accuracy": True, "macro_f1": False}


def _predictions(folder, fine_tuned, zero_shot):
    import json

    folder.mkdir()
    pairs = zip(fine_tuned, zero_shot)
    rows = [{"fine_tuned": {"prediction_index": a}, "zero_shot": {"prediction_index": b}} for a, b in pairs]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_demo_gates_hold_for_each_model(tmp_path):
    import json

    fp32 = _predictions(tmp_path / "a", [0] * 100, [1] * 100)
    bf16 = _predictions(tmp_path / "b", [0] * 100, [1] * 98 + [2, 2])
    gate = evaluation_gate(fp32, bf16)
    assert gate["agreement"] == {"fine_tuned": 1.0, "zero_shot": 0.98} and not gate["passes"]
    for folder, values in ((tmp_path / "a", [[1, 5], [2, 0], [3, 9]]), (tmp_path / "b", [[2, 5], [4, 0], [6, 9]])):
        for model in ("fine_tuned", "zero_shot"):
            explanation = {"values": [values], "target_classes": [0]}
            (folder / f"{model}_shap.json").write_text(json.dumps(explanation))
    gate = explain_gate(tmp_path / "a", tmp_path / "b")  # class 0: (1, 2, 3) vs (2, 4, 6), r = 1
    assert gate["pearson_r"]["fine_tuned"] == pytest.approx(1.0) and gate["passes"]


def test_policy_record_passes_a_phase_only_where_every_gate_of_it_passed():
    passed, failed = {"passes": True, "summary": "ok"}, {"passes": False, "summary": "no"}
    results = {
        "gates": {"evaluation": passed, "shap": failed},
        "dtype_gates": {"gates": {"fit": passed, "evaluation": passed, "explain": passed}},
    }
    record = policy_record(results)
    assert {phase: gate["passes"] for phase, gate in record["gates"].items()} == {
        "fit": True,
        "evaluation": True,
        "explain": False,  # the base model's SHAP gate failed
    }
    assert policy_record({"gates": {"evaluation": passed}}) is None  # not every gate measured


def test_whole_run_peak_is_each_child_process_own():
    """bench_memory.py compares two runs by their own processes' peaks: a small child after a large one reads small
    (not the maximum over every child so far, as RUSAGE_CHILDREN would)."""
    from bench.bench_memory import peak_of

    allocate = "import numpy as np; a = np.ones({} * 2**20 // 8); print(a.sum())"
    large, _ = peak_of(["-c", allocate.format(400)], threads=None)
    small, _ = peak_of(["-c", allocate.format(10)], threads=None)
    assert large > 0.39  # 400 MiB of touched float64s
    assert small < large - 0.3


def test_memory_rows_carry_each_peak_and_its_ratio_to_the_original():
    from bench.bench_all import memory_json_rows, memory_lines

    memory = {
        "sizes": {"train": 64, "eval": 64, "shap": 3, "max_evals": 200},
        "rows": [
            {"path": "ours", "dtype": "auto", "peak_rss_gib": 1.5, "seconds": 100.0},
            {"path": "original", "dtype": "float32", "peak_rss_gib": 6.0, "seconds": 400.0},
        ],
        "ratio": 0.25,
        "target": 0.25,
        "meets_target": True,
    }
    rows = memory_json_rows(memory)
    assert [(row["path"], row["peak_gib"], row["check"]) for row in rows] == [
        ("ours", 1.5, "25% of the original's peak"),
        ("original", 6.0, "100% of the original's peak"),
    ]
    assert "ours 1.50 GiB" in memory_lines(memory)[0] and "meets the target <= 25%" in memory_lines(memory)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB, /proc")
def test_a_measured_child_reports_its_own_usage_not_the_parents_peak():
    """The parent holds 400 MiB resident; a child that touches 64 MiB reports a peak well under the parent's (Linux
    would carry the parent's peak into a directly spawned child), at least its 64 MiB, and a fault per 4 KiB page."""
    held = np.ones(400 * 2**20 // 8)  # every page written: resident
    # a bytearray, not numpy: numpy asks for huge pages, which would fault 2 MiB at a time
    child = "block = bytearray(64 * 2**20)\nfor i in range(0, len(block), 4096): block[i] = 1"
    code, seconds, usage = run_with_usage([sys.executable, "-c", child])
    assert code == 0 and seconds > 0
    assert 64 / 1024 <= usage["peak_rss_gib"] < 0.35, usage  # the interpreter adds ~10 MiB, never the parent's 400
    assert usage["minor_faults"] >= 64 * 2**20 // 4096
    assert usage["user_s"] + usage["sys_s"] > 0
    assert held[-1] == 1.0


def test_matmul_paths_time_every_path_and_measure_its_error_against_float64(tiny_llama):
    """Each prepacked path computes the layer's products: its reported error against float64 products is float32
    rounding (the products here are up to a few tenths in size, so a path that returned zeros or used the wrong weight
    would report an error near that size)."""
    from bench.bench_matmul_paths import measure_rows

    weights = [p.detach() for p in tiny_llama.model.layers[0].parameters() if p.dim() == 2]
    row = measure_rows(weights, rows=8, off_hint=4, trials=1, seconds=1e-3)
    assert set(row) == {"rows", "linear", "mkl packed", "mkl packed for other rows", "onednn", "onednn plain"}
    for name in set(row) - {"rows"}:
        assert row[name]["us"] > 0
        assert row[name]["error"] < 1e-5, name
