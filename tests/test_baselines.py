"""Prompt-only baselines: contextual calibration and k-shot demonstrations in the cached prefix."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from analysis.statistics.calibration import calibrate, content_free_prior
from datamodules import TweetSentimentDataModule
from datamodules.prompts import sample_demonstrations
from foundation.errors import UserInputError
from lightning_modules.scoring import LabelScorer


def test_calibration_matches_a_hand_computed_case():
    # prior = mean of [0.6, 0.3, 0.1] and [0.4, 0.3, 0.3] = [0.5, 0.3, 0.2]
    prior = content_free_prior(np.array([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]]))
    np.testing.assert_allclose(prior, [0.5, 0.3, 0.2])
    # [0.6/0.5, 0.3/0.3, 0.1/0.2] = [1.2, 1.0, 0.5], sum 2.7
    np.testing.assert_allclose(calibrate(np.array([[0.6, 0.3, 0.1]]), prior), [[1.2 / 2.7, 1.0 / 2.7, 0.5 / 2.7]])
    # A model that always prefers class 0 by the prior's ratio becomes uniform.
    np.testing.assert_allclose(calibrate(np.array([0.5, 0.3, 0.2]), prior), [1 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError):
        calibrate(np.array([[0.5, 0.5]]), np.array([1.0, 0.0]))


def test_demonstrations_are_seeded_balanced_and_never_from_the_eval_texts():
    texts = [f"tweet {i}" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    eval_texts = ["tweet 0", "tweet 1", "tweet  2"]  # whitespace variants count as the same text
    first = sample_demonstrations(texts, labels, 7, 3, seed=3, exclude_texts=eval_texts)
    assert first == sample_demonstrations(texts, labels, 7, 3, seed=3, exclude_texts=eval_texts)
    assert first != sample_demonstrations(texts, labels, 7, 3, seed=4, exclude_texts=eval_texts)
    counts = collections.Counter(label for _, label in first)
    assert sorted(counts.values()) == [2, 2, 3] and len({t for t, _ in first}) == 7
    assert not {t for t, _ in first} & {"tweet 0", "tweet 1", "tweet 2"}
    for text, label in first:
        assert labels[texts.index(text)] == label
    with pytest.raises(UserInputError, match="Cannot draw"):
        sample_demonstrations(texts[:6], labels[:6], 9, 3, seed=0)


def test_k_shot_prefix_holds_training_demonstrations_and_scores_like_a_plain_forward(synthetic_folder, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    dm = TweetSentimentDataModule(dataset_name=synthetic_folder, tokenizer_name=tiny_model_dir, seed=0)
    encoder = dm.make_encoder(num_demonstrations=4)
    assert len(encoder.demonstrations) == 4
    train_texts = {e.text for e in dm.train_examples}
    assert all(text in train_texts for text, _ in encoder.demonstrations)
    assert not {t for t, _ in encoder.demonstrations} & {e.text for e in dm.eval_examples}
    zero_shot = dm.make_encoder(0)
    assert len(encoder.prefix_ids) > len(zero_shot.prefix_ids) + 4 * 4
    assert encoder.instruction.count("Label:") == 4 and encoder.instruction.endswith("Tweet:")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial model: perturb the weights so the prefix matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = [e.text for e in dm.eval_examples[:9]]
    kwargs = dict(label_token_ids=encoder.label_token_ids, batch_size=4, pad_token_id=dm.tokenizer.pad_token_id)
    cached = LabelScorer(model, encoder.prefix_ids, **kwargs)([encoder.continuation(t) for t in texts])
    with torch.no_grad():  # the oracle: one plain forward of each whole k-shot prompt
        last = torch.stack([model(torch.tensor([encoder.encode(t).input_ids])).logits[0, -1] for t in texts])
    plain = torch.softmax(last[:, encoder.label_token_ids].double(), -1).numpy()
    assert np.abs(cached.probabilities - plain).max() <= 1e-5
    without = LabelScorer(model, zero_shot.prefix_ids, **kwargs)([zero_shot.continuation(t) for t in texts])
    assert np.abs(without.probabilities - cached.probabilities).max() > 1e-4  # the demonstrations change the scores
