"""ROAR on the tiny model: the removed words are exactly the top-ranked ones by leave-one-out computed with plain
forwards, the random control removes as many, every condition retrains with the run's recipe, and the three files
hold what the retrained adapters score, as does the report page."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import yaml

from analysis.roar.removal import keep_mask, random_removal, ranked_removal, removal_count
from datamodules.prompts import PromptEncoder
from foundation.output_names import (
    REPORT_FILE,
    ROAR_COMPARISON_PLOT,
    ROAR_DATA_DIR,
    ROAR_METRICS_FILE,
    ROAR_RESULTS_FILE,
    ROAR_RUNS_DIR,
)
from tests.test_analysis import LABELS, plain_forward
from tests.tiny import build_tiny_tokenizer, tensorboard_events

CONDITIONS = ("none", "random_50", "occlusion_50")


def roar(trained: dict, output_dir, *extra: str, log=lambda message: None):
    from analysis.configuration import load_run
    from analysis.roar.run import check_roar, run_roar

    arguments = [
        "--config",
        str(trained["config"]),
        "--compare.adapter",
        str(trained["adapter"]),
        "--compare.n_resamples",
        "50",
        "--roar.output_dir",
        str(output_dir),
        "--roar.fractions",
        "[0.5]",
        "--data.train_subset",
        "16",
        "--data.eval_subset",
        "9",
        "--trainer.max_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    return run_roar(load_run(arguments, check=check_roar), log=log)


@pytest.fixture(scope="module")
def ran(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("roar")
    return out, roar(trained, out)


def test_removal_rules_by_hand():
    assert [removal_count(n, 0.5) for n in (1, 2, 3, 4, 5)] == [0, 1, 2, 2, 3]  # halves up, one word always kept
    assert [removal_count(n, 0.1) for n in (2, 9, 10, 15)] == [1, 1, 1, 2]
    assert removal_count(10, 0.3) == 3 and removal_count(5, 0.3) == 2  # 1.5 rounds half up
    np.testing.assert_array_equal(ranked_removal(np.array([0.1, -0.9, 0.3, 0.9, 0.0]), 0.5), [1, 2, 3])  # |.|
    np.testing.assert_array_equal(ranked_removal(np.array([0.2, 0.2, 0.2, 0.2]), 0.5), [0, 1])  # earlier first
    drawn = random_removal(10, 0.3, np.random.default_rng(0))
    assert len(drawn) == 3 and len(set(drawn.tolist())) == 3
    np.testing.assert_array_equal(keep_mask(4, np.array([0, 2])), [False, True, False, True])


def test_removals_are_the_top_leave_one_out_words(ran, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = ran
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"]), trained["adapter"])
    tuned.eval()
    encoder = PromptEncoder(build_tiny_tokenizer(), LABELS)
    results = json.loads((out / ROAR_RESULTS_FILE).read_text())
    tweets = results["tweets"]
    assert sum(t["split"] == "train" for t in tweets) == 16 and sum(t["split"] == "test" for t in tweets) == 9
    rows = {
        name: {
            s: [json.loads(x) for x in (out / ROAR_DATA_DIR / name / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")
        }
        for name in CONDITIONS
    }
    seen = {"train": 0, "test": 0}
    for tweet in tweets:
        words = tweet["text"].split()
        full = plain_forward(tuned, encoder, [tweet["text"]])[0]
        target = int(np.argmax(full))
        without = plain_forward(tuned, encoder, [" ".join(words[:j] + words[j + 1 :]) for j in range(len(words))])
        occlusion = np.abs(full[target] - without[:, target])
        removed = tweet["removed"]["occlusion_50"]
        kept = [j for j in range(len(words)) if j not in removed]
        assert tweet["target"] == target and len(removed) == removal_count(len(words), 0.5)
        # the removed words are the largest |leave-one-out| ones (up to float noise between near-equal values)
        assert occlusion[removed].min() >= occlusion[kept].max() - 1e-6
        assert len(tweet["removed"]["random_50"]) == len(removed)
        position = seen[tweet["split"]]
        seen[tweet["split"]] += 1
        for name, drop in (("none", []), ("random_50", tweet["removed"]["random_50"]), ("occlusion_50", removed)):
            row = rows[name][tweet["split"]][position]
            assert row["text"] == " ".join(w for j, w in enumerate(words) if j not in drop)
            assert row["label"] == LABELS[tweet["gold"]]


def test_every_condition_retrains_with_the_recipe_and_is_scored(ran, trained):
    out, result = ran
    metrics = json.loads((out / ROAR_METRICS_FILE).read_text())["conditions"]
    assert set(metrics) == set(CONDITIONS)
    for name in CONDITIONS:
        config = yaml.safe_load((out / ROAR_RUNS_DIR / name / "config.yaml").read_text())
        assert config["trainer"]["max_steps"] == 2  # the command line's recipe reaches every fit
        assert config["data"]["dataset_name"] == str(out / ROAR_DATA_DIR / name)
        assert (out / ROAR_RUNS_DIR / name / "lora_adapter" / "adapter_model.safetensors").is_file()
        saved = json.loads((out / ROAR_RUNS_DIR / name / "result.json").read_text())
        probabilities, labels = np.array(saved["probabilities"]), np.array(saved["labels"])
        assert probabilities.shape == (9, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        assert metrics[name]["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(axis=1) == labels)))
        assert metrics[name]["n_train"] == 16 and metrics[name]["n_eval"] == 9
    shares = metrics["occlusion_50"]["removed_share"]
    assert 0.3 < shares["train"] <= 0.5 and metrics["none"]["removed_share"]["train"] == 0
    analysis = json.loads((out / ROAR_RESULTS_FILE).read_text())["explainers"]["occlusion"]["50"]
    assert analysis["roar_score"] == pytest.approx(
        metrics["random_50"]["accuracy"] - metrics["occlusion_50"]["accuracy"]
    )
    assert analysis["vs_random"]["accuracy"]["difference"] == pytest.approx(-analysis["roar_score"])
    check = json.loads((out / ROAR_RESULTS_FILE).read_text())["learning_check"]
    labels = json.loads((out / ROAR_RUNS_DIR / "none" / "result.json").read_text())["labels"]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    assert check["majority_share"] == pytest.approx(majority)
    none_low = metrics["none"]["confidence_intervals"]["accuracy"]["low"]
    assert check["learned"] == (none_low > majority)  # else the run warns that ROAR measures noise
    assert any(line.startswith("warning: the adapter retrained") for line in result.summary) != check["learned"]
    assert (out / ROAR_COMPARISON_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("| occlusion_50 |") for line in result.summary)
    events = tensorboard_events(out / "tensorboard")
    assert "roar/comparison" in events.Tags()["images"]
    (accuracy,) = events.Scalars("roar/occlusion_50/accuracy")
    assert accuracy.value == pytest.approx(metrics["occlusion_50"]["accuracy"])
    (table,) = events.Tensors("roar/summary/text_summary")
    assert "| occlusion_50 |" in table.tensor_proto.string_val[0].decode()


def test_a_rerun_refits_nothing(ran, trained):
    out, _ = ran
    stamps = {name: (out / ROAR_RUNS_DIR / name / "result.json").stat().st_mtime_ns for name in CONDITIONS}
    logged = []
    again = roar(trained, out, log=logged.append)
    assert again.complete
    assert all(f"ROAR {name}: retrained before, kept" in logged for name in CONDITIONS)
    assert stamps == {name: (out / ROAR_RUNS_DIR / name / "result.json").stat().st_mtime_ns for name in CONDITIONS}


def test_the_report_shows_every_condition_and_the_learning_check(ran, tmp_path):
    from tests.test_report_browser import CHROMIUM, open_in_chromium, visible_text

    out, result = ran
    assert out / REPORT_FILE in result.files
    page = (out / REPORT_FILE).read_text()
    text = visible_text(open_in_chromium(out / REPORT_FILE, tmp_path / "profile")[0] if CHROMIUM else page)
    metrics = json.loads((out / ROAR_METRICS_FILE).read_text())["conditions"]
    results = json.loads((out / ROAR_RESULTS_FILE).read_text())
    for name in CONDITIONS:
        row, ci = metrics[name], metrics[name]["confidence_intervals"]
        for key in ("accuracy", "macro_f1"):
            assert f"{row[key]:.4f} [{ci[key]['low']:.4f}, {ci[key]['high']:.4f}]" in text, (name, key)
    versus = results["explainers"]["occlusion"]["50"]
    d = versus["vs_random"]["accuracy"]
    assert f"{d['difference']:.4f} [{d['ci_low']:.4f}, {d['ci_high']:.4f}]" in text
    assert versus["verdict"] in text
    assert ("the recipe has not learned the task" in text) != results["learning_check"]["learned"]
    plot = base64.b64encode((out / ROAR_COMPARISON_PLOT).read_bytes()).decode()
    assert page.count(f'src="data:image/png;base64,{plot}"') == 1  # the curves, once, in the ROAR section
    assert "<script" not in page
