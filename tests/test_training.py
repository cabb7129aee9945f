"""The LightningModule on a tiny Llama: training, 4-bit, checkpoints, adapter export, zero-shot isolation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules import TweetSentimentDataModule
from lightning_modules import ExportAdapter, LoRASentimentClassifier
from lightning_modules.scoring import LabelScorer


def make_pair(folder: str, model_dir: str, **model_kwargs):
    dm = TweetSentimentDataModule(dataset_name=folder, tokenizer_name=model_dir, batch_size=8, seed=0)
    module = LoRASentimentClassifier(
        model_name=model_dir,
        label_names=dm.label_names,
        label_token_ids=dm.label_token_ids,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        **{"load_in_4bit": False, **model_kwargs},
    )
    return dm, module


def trainer(root, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def batch_of(dm: TweetSentimentDataModule, n: int = 8) -> dict:
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


@torch.no_grad()
def label_logits(module, batch) -> torch.Tensor:
    module.eval()
    return module.label_position_logits(batch)[:, module.label_token_ids]


def test_fit_lowers_the_label_loss(synthetic_folder, tiny_model_dir, tmp_path):
    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = module._step(batch)[0].item()
    trainer(tmp_path, max_epochs=8, enable_checkpointing=False).fit(module, dm)
    module.eval()
    with torch.no_grad():
        after = module._step(batch)[0].item()
    assert after < before - 0.3, (before, after)  # untrained: ~ln(vocab); a no-op fit leaves it unchanged


def test_checkpoint_holds_only_the_adapter_and_resumes(synthetic_folder, tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir)
    ckpt_dir = tmp_path / "checkpoints"
    first = trainer(tmp_path, max_steps=3, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    first.fit(module, dm)
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert saved["state_dict"] and all("lora_" in key for key in saved["state_dict"])
    assert saved["global_step"] == 3 and saved["optimizer_states"] and saved["lr_schedulers"]
    trained = {k: v.clone() for k, v in module.trainable_state_dict().items()}

    dm2, resumed = make_pair(synthetic_folder, tiny_model_dir)
    second = trainer(tmp_path, max_steps=5, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.trainable_state_dict().items()})

    second.callbacks.append(Spy())
    second.fit(resumed, dm2, ckpt_path="last")
    assert second.global_step == 5
    for key, value in trained.items():
        torch.testing.assert_close(seen[key], value)


def test_exported_adapter_reproduces_the_module_logits(synthetic_folder, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_modules.scoring import logits_at_positions

    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir)
    trainer(tmp_path, max_steps=4, enable_checkpointing=False, callbacks=[ExportAdapter()]).fit(module, dm)
    adapter = tmp_path / "lora_adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    batch = batch_of(dm)
    expected = label_logits(module, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        got = logits_at_positions(reloaded, batch["input_ids"], batch["label_position"] - 1, batch["attention_mask"])
    torch.testing.assert_close(got[:, module.label_token_ids], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, label_logits_zero_shot(module, batch), atol=1e-4)


def label_logits_zero_shot(module, batch) -> torch.Tensor:
    with module.adapter(False):
        return label_logits(module, batch)


def test_zero_shot_is_the_untouched_base_model_after_training(synthetic_folder, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_modules.scoring import logits_at_positions

    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir)
    batch = batch_of(dm)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        plain = logits_at_positions(base, batch["input_ids"], batch["label_position"] - 1, batch["attention_mask"])
    before_training = label_logits(module, batch)
    torch.testing.assert_close(before_training, plain[:, module.label_token_ids])  # LoRA B starts at zero
    trainer(tmp_path, max_steps=4, enable_checkpointing=False).fit(module, dm)
    trainable = sorted(name for name, p in module.backbone.named_parameters() if p.requires_grad)
    torch.testing.assert_close(label_logits_zero_shot(module, batch), plain[:, module.label_token_ids])
    assert (label_logits(module, batch) - before_training).abs().max() > 1e-3
    # after the zero-shot read the adapter trains again: the same LoRA weights require gradients
    assert trainable and all("lora_" in name for name in trainable)
    assert sorted(name for name, p in module.backbone.named_parameters() if p.requires_grad) == trainable


def test_prefix_cached_scores_equal_plain_forward(synthetic_folder, tiny_model_dir, tmp_path):
    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir)
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, dm)
    module.eval()
    encoder = dm.encoder
    texts = [e.text for e in dm.eval_examples[:10]] + ["love", "the bus is so really awful on a monday day"]
    continuations = [encoder.continuation(t) for t in texts]
    labels = encoder.label_token_ids
    with torch.no_grad():  # the oracle: one plain forward of each whole prompt
        last = torch.stack([module.backbone(torch.tensor([encoder.encode(t).input_ids])).logits[0, -1] for t in texts])
    expected = torch.softmax(last[:, labels].double(), -1).numpy()
    expected_mass = torch.softmax(last.double(), -1)[:, labels].sum(-1).numpy()
    for mode in ("prefix_cache", "padded"):
        scores = LabelScorer(
            module.backbone, encoder.prefix_ids, labels, mode=mode, batch_size=4, pad_token_id=dm.tokenizer.pad_token_id
        )(continuations)
        assert abs(scores.probabilities - expected).max() <= 1e-5, mode
        assert abs(scores.label_space_mass - expected_mass).max() <= 1e-5, mode
        assert scores.probabilities.sum(1) == pytest.approx(1.0)


def test_4bit_nf4_path_trains_on_cpu(synthetic_folder, tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    L.seed_everything(0)
    dm, module = make_pair(synthetic_folder, tiny_model_dir, load_in_4bit=True, force_4bit_on_cpu=True)
    assert module.quantized
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    batch = batch_of(dm)
    before = label_logits(module, batch)
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, dm)
    assert torch.isfinite(label_logits(module, batch)).all()
    assert (label_logits(module, batch) - before).abs().max() > 0
    torch.testing.assert_close(label_logits_zero_shot(module, batch), before)


def test_without_cuda_4bit_falls_back_to_full_precision(synthetic_folder, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("the fallback only applies without CUDA")
    with pytest.warns(UserWarning, match="full precision"):
        _, module = make_pair(synthetic_folder, tiny_model_dir, load_in_4bit=True)
    assert not module.quantized
