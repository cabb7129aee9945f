"""Every explainer beside the Partition explainer, on the tiny model, each against an independent computation:
plain `model(...).logits` forwards, brute-force Shapley values, sklearn's ridge on a hand-drawn LIME neighbourhood,
a hand Riemann sum of autograd gradients; and the cross-explainer results the run writes."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch

from analysis.explanation.shap_values import load_explanation
from analysis.models import FINE_TUNED, ZERO_SHOT
from analysis.report.page import render_report
from analysis.report.tables import analysis_summary
from analysis.settings import EXPLAINERS
from analysis.statistics.shapley import all_coalitions, shapley_values
from datamodules.prompts import PromptEncoder
from foundation.output_names import INTERPRETABILITY_FILE, XAI_PROPERTIES_FILE, explanation_file
from tests.test_analysis import LABELS, analyze, plain_forward
from tests.tiny import build_tiny_tokenizer, tensorboard_events

KERNEL_SAMPLES = 200  # >= 2^6 - 2: the tiny tweets (at most 6 words) are enumerated, so KernelSHAP is exact


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder(build_tiny_tokenizer(), LABELS)


@pytest.fixture(scope="module")
def models(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"]), trained["adapter"])
    return {ZERO_SHOT: base, FINE_TUNED: tuned.eval()}


@pytest.fixture(scope="module")
def explained(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("explainers")
    result = analyze(
        trained, out, example_count=3, explainers=list(EXPLAINERS), measure_stability=True, kernel_samples=200
    )
    return out, result


def _content(out, model: str, explainer: str) -> dict:
    return json.loads((out / explanation_file(model, explainer)).read_text())


def _subsets(words: list[str]) -> tuple[np.ndarray, list[str]]:
    coalitions = all_coalitions(len(words))
    return coalitions, [" ".join(w for w, keep in zip(words, row) if keep) for row in coalitions]


def test_every_explainer_writes_a_loadable_file_on_the_same_features(explained):
    out, _ = explained
    for model in (ZERO_SHOT, FINE_TUNED):
        shap_content = _content(out, model, "partition")
        for explainer in EXPLAINERS:
            content = _content(out, model, explainer)
            explanation = load_explanation(out / explanation_file(model, explainer))
            assert content["feature_names"] == shap_content["feature_names"]
            assert content["target_classes"] == shap_content["target_classes"]  # one target for every explainer
            for i, words in enumerate(shap_content["feature_names"]):
                assert explanation.values[i].shape == (len(words), len(LABELS))


def test_kernel_shap_is_additive_and_exact_when_it_enumerates(explained, models, encoder):
    out, _ = explained
    for name, model in models.items():
        content = _content(out, name, "kernel")
        for i, text in enumerate(content["texts"]):
            words = text.split()
            coalitions, texts = _subsets(words)
            assert 2 ** len(words) - 2 <= KERNEL_SAMPLES and content["exact"][i]
            exact = shapley_values(plain_forward(model, encoder, texts))
            np.testing.assert_allclose(content["values"][i], exact, atol=1e-5)
            full, empty = plain_forward(model, encoder, [text, ""])
            np.testing.assert_allclose(content["base_values"][i], empty, atol=1e-5)  # every feature deleted
            np.testing.assert_allclose(np.sum(content["values"][i], axis=0) + empty, full, atol=1e-5)
            assert content["additivity_error"][i] < 1e-6
            assert content["evaluations"][i] == 2 ** len(words)  # every coalition between the background and x


def test_sampled_kernel_shap_stays_additive(models, encoder):
    from analysis.explanation.perturbation import kernel_values
    from analysis.explanation.shap_values import JointValueFunction, LabelProbabilities, tweet_masker

    text = "my really happy monday day this is so great the a my table bus"
    masker = tweet_masker(encoder)
    joint = JointValueFunction({"m": LabelProbabilities.for_model(models[ZERO_SHOT], encoder)})
    sampled = kernel_values(text, len(text.split()), joint, masker, budget=60, seed=3)["m"]
    again = kernel_values(text, len(text.split()), joint, masker, budget=60, seed=3)["m"]
    full, empty = plain_forward(models[ZERO_SHOT], encoder, [text, ""])
    np.testing.assert_allclose(sampled["values"].sum(axis=0) + empty, full, atol=1e-5)  # 60 of 16,382 coalitions
    np.testing.assert_array_equal(sampled["values"], again["values"])  # seeded
    assert not sampled["exact"] and sampled["evaluations"] <= 60 + 2


def test_lime_is_a_weighted_ridge_on_its_neighbourhood(explained, models, encoder):
    """The neighbourhood drawn by hand as LimeTextExplainer draws it (seed + example index), scored by plain
    forwards, fitted with sklearn's ridge and LIME's kernel: the file holds those coefficients and R^2."""
    from sklearn.linear_model import Ridge

    out, _ = explained
    for name, model in models.items():
        content = _content(out, name, "lime")
        for i, (text, index) in enumerate(zip(content["texts"], content["example_indices"])):
            words = text.split()
            rng = np.random.RandomState(0 + index)
            data = np.ones((512, len(words)))
            for row, size in enumerate(rng.randint(1, len(words) + 1, 511), start=1):
                data[row, rng.choice(len(words), size, replace=False)] = 0
            labels = plain_forward(model, encoder, [" ".join(w for w, k in zip(words, row) if k) for row in data])
            cosine = 1 - data @ data[0] / (np.linalg.norm(data, axis=1) * np.linalg.norm(data[0]) + 1e-300)
            weights = np.sqrt(np.exp(-((cosine * 100) ** 2) / 25**2))
            for c in range(len(LABELS)):
                ridge = Ridge(alpha=1).fit(data, labels[:, c], sample_weight=weights)
                np.testing.assert_allclose(np.asarray(content["values"][i])[:, c], ridge.coef_, atol=1e-5)
                assert content["base_values"][i][c] == pytest.approx(ridge.intercept_, abs=1e-5)
                assert content["r2"][i][c] == pytest.approx(ridge.score(data, labels[:, c], weights), abs=1e-5)


def _riemann_ig(model, encoder, text: str, target: int, steps: int = 400) -> np.ndarray:
    """Midpoint Riemann sum of autograd gradients of a plain whole-prompt forward (no cache), per token."""
    prompt = encoder.encode(text)
    start, end = prompt.tweet_span
    embed = model.get_input_embeddings()(torch.tensor([prompt.input_ids])).detach()
    total = torch.zeros(end - start, embed.shape[-1])
    for alpha in (np.arange(steps) + 0.5) / steps:
        scaled = embed.clone()
        scaled[0, start:end] = embed[0, start:end] * float(alpha)
        scaled.requires_grad_(True)
        logits = model(inputs_embeds=scaled).logits[0, -1, encoder.label_token_ids]
        (gradient,) = torch.autograd.grad(torch.softmax(logits.double(), -1)[target], scaled)
        total += gradient[0, start:end].float()
    return (total / steps * embed[0, start:end]).sum(-1).numpy()


def test_integrated_gradients_are_complete_and_match_a_riemann_sum(explained, models, encoder):
    out, _ = explained
    for name, model in models.items():
        content = _content(out, name, "integrated_gradients")
        for i, text in enumerate(content["texts"]):
            full = plain_forward(model, encoder, [text])[0]
            values = np.asarray(content["values"][i])
            assert content["completeness_error"][i] < 1e-4
            np.testing.assert_allclose(values.sum(axis=0) + content["base_values"][i], full, atol=1e-4)
        # one word per token in the tiny vocabulary: the per-word values are the per-token ones
        text, target = content["texts"][1], content["target_classes"][1]
        riemann = _riemann_ig(model, encoder, text, target)
        np.testing.assert_allclose(np.asarray(content["values"][1])[:, target], riemann, atol=2e-5)
    zero_shot, tuned = (np.asarray(_content(out, m, "integrated_gradients")["values"][0]) for m in models)
    assert np.abs(zero_shot - tuned).max() > 1e-4  # the gradient flows through the adapter


def test_integrated_gradients_through_the_4bit_model(trained, encoder):
    """NF4 base weights (bitsandbytes on this CPU) with the LoRA adapter: the gradients still add up."""
    from analysis.explanation.gradients import integrated_gradients
    from analysis.explanation.shap_values import LabelProbabilities, tweet_masker
    from analysis.models import ModelSpec
    from lightning_modules import LoRASentimentClassifier
    from lightning_modules.adapters import load_adapter

    module = LoRASentimentClassifier(
        model_name=trained["model"],
        label_names=LABELS,
        label_token_ids=encoder.label_token_ids,
        load_in_4bit=True,
        force_4bit_on_cpu=True,
        lora_dropout=0.0,
    )
    assert module.quantized
    load_adapter(module, trained["adapter"], None)
    module.eval()
    text = "the bus is so awful , really"
    for use_adapter in (False, True):
        spec = ModelSpec("m", encoder, use_adapter=use_adapter)
        result = integrated_gradients(module, spec, text, tweet_masker(encoder), steps=32, batch_size=16)
        value = LabelProbabilities(spec.scorer(module, "padded", "labels"), encoder)
        full, _ = value([text, ""])
        np.testing.assert_allclose(result["full"], full, atol=1e-5)
        assert result["completeness_error"] < 1e-3
        assert np.abs(result["values"]).max() > 0


def test_occlusion_is_leave_one_out_by_plain_forwards(explained, models, encoder, trained):
    out, _ = explained
    for name, model in models.items():
        content = _content(out, name, "occlusion")
        explanation = load_explanation(out / explanation_file(name, "occlusion"))  # the SHAP file's layout
        for i, text in enumerate(content["texts"]):
            words = text.split()  # word features: the whitespace units of the tweet
            full = plain_forward(model, encoder, [" ".join(words)])[0]
            without = plain_forward(model, encoder, [" ".join(words[:j] + words[j + 1 :]) for j in range(len(words))])
            np.testing.assert_allclose(explanation.values[i], full[None, :] - without, atol=1e-5)
            np.testing.assert_allclose(content["base_values"][i], full, atol=1e-5)
            assert content["evaluations"][i] == len(words) + 1


def test_agreement_verdicts_and_properties_are_measured(explained):
    out, result = explained
    metrics = json.loads((out / INTERPRETABILITY_FILE).read_text())
    properties = json.loads((out / XAI_PROPERTIES_FILE).read_text())
    pairs = {f"{a}_vs_{b}" for a, b in combinations(EXPLAINERS, 2)}
    for model in (ZERO_SHOT, FINE_TUNED):
        agreement = metrics["explainer_agreement"][model]
        assert set(agreement) == pairs
        assert all(-1 <= row["spearman"]["mean"] <= 1 for row in agreement.values() if row["spearman"]["n"])
        for explainer in EXPLAINERS:
            measured = properties["models"][model][explainer]
            assert set(measured) == set(properties["definitions"])
            assert 0 <= measured["selectivity"]["mean"] < 1 and 0 < measured["compactness"]["mean"] <= 1
            assert measured["evaluations_per_explanation"]["mean"] >= 2
        for deterministic in ("occlusion", "integrated_gradients"):
            assert properties["models"][model][deterministic]["identity"]["mean"] == 1.0
        # occlusion and KernelSHAP here are exact functions of the model: the same values on a rerun
        assert properties["models"][model]["kernel"]["identity"]["mean"] == pytest.approx(1.0)
    verdicts = metrics["explainer_verdicts"][f"{FINE_TUNED}_vs_{ZERO_SHOT}"]
    assert set(verdicts["explainers"]) == set(EXPLAINERS)
    assert all(row["verdict"].startswith(name) for name, row in verdicts["explainers"].items())
    assert verdicts["consistent"] == (len({row["direction"] for row in verdicts["explainers"].values()}) == 1)
    page = render_report(out)
    for heading in ("Agreement between explainers", "The comparison under each explainer", "XAI properties, measured"):
        assert heading in page
    assert verdicts["explainers"]["lime"]["verdict"] in page.replace("&#x27;", "'")
    printed = analysis_summary(result)  # what analyze.py prints
    assert f"{FINE_TUNED}_vs_{ZERO_SHOT} under each explainer: {verdicts['conclusion']}" in printed
    events = tensorboard_events(out / "tensorboard")  # beside the fit's loss curve, the figures and the table
    for figure in ("explainer_agreement", "deletion_curves", f"{FINE_TUNED}_shap_summary"):
        assert f"analysis/{figure}" in events.Tags()["images"]
    assert "explained" in events.Tensors("analysis/summary/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_a_rerun_without_an_explainer_removes_its_files(trained, tmp_path):
    analyze(trained, tmp_path, example_count=2, explainers=["partition", "lime"], lime_samples=20)
    assert len(list(tmp_path.glob("*_lime.json"))) == 2
    analyze(trained, tmp_path, example_count=2)
    assert not list(tmp_path.glob("*_lime.json"))  # never two runs' explainers in one folder
