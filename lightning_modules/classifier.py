"""LightningModule: a (4-bit) causal LM with LoRA, trained and evaluated on one label token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
)

from foundation.embedded_model import EMBEDDED_MODEL
from foundation.errors import UserInputError
from foundation.hub import resolve_token
from lightning_modules.backbone import AdapterSwitch, attach_lora, load_causal_lm, use_4bit
from lightning_modules.checkpointing import random_states, restore_random_states
from lightning_modules.scoring import LabelScorer, logits_at_positions


def _metrics(num_classes: int) -> MetricCollection:
    def per(cls, average):
        return cls(num_classes=num_classes, average=average)

    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "precision_macro": per(MulticlassPrecision, "macro"),
            "recall_macro": per(MulticlassRecall, "macro"),
            "f1_macro": per(MulticlassF1Score, "macro"),
            "precision_weighted": per(MulticlassPrecision, "weighted"),
            "recall_weighted": per(MulticlassRecall, "weighted"),
            "f1_weighted": per(MulticlassF1Score, "weighted"),
            "f1_per_class": per(MulticlassF1Score, "none"),
            "mcc": MulticlassMatthewsCorrCoef(num_classes=num_classes),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes=num_classes),
        }
    )


class LoRASentimentClassifier(L.LightningModule):
    """Causal LM + LoRA, supervised only at the label token and read through the label tokens' logits.

    Args:
        model_name: hub id (e.g. meta-llama/Llama-3.2-1B), a local folder, or `embedded:smollm2-135m-instruct`.
        label_names / label_token_ids: the classes and their verbalizer token ids (linked from the DataModule).
        load_in_4bit: NF4 quantisation; without CUDA it falls back to full precision unless `force_4bit_on_cpu`.
        dtype: the frozen base's weights / compute dtype: `float32`, `bfloat16`, `float16` (fit: a GPU's, with
            `--trainer.precision 16-mixed`), or `auto`: bf16 where this machine has it natively and the bf16 gates
            recorded for this model on this kind of machine pass, else fp32 (`lightning_modules.precision`; each
            command resolves it for its phase). The LoRA weights, their gradients and the optimizer state are fp32.
        huggingface_token: for gated repos; never saved (the CLI moves it into the environment and blanks it).
    """

    def __init__(
        self,
        model_name: str = EMBEDDED_MODEL,
        label_names: list[str] | None = None,
        label_token_ids: list[int] | None = None,
        load_in_4bit: bool = True,
        force_4bit_on_cpu: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.1,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        gradient_checkpointing: bool | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        huggingface_token: str | None = None,
    ):
        super().__init__()
        if not label_names or not label_token_ids or len(label_names) != len(label_token_ids):
            raise UserInputError(
                "The classifier needs one label token per class (label_names and label_token_ids of equal length); "
                "they come from the DataModule when run through scripts/train.py."
            )
        self.save_hyperparameters(ignore=["huggingface_token"])
        self.label_names = list(label_names)
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)
        self.quantized = use_4bit(load_in_4bit, force_4bit_on_cpu)
        token = resolve_token(huggingface_token)
        base = load_causal_lm(model_name, self.quantized, token=token, revision=revision, dtype=dtype)
        checkpointing = self.quantized if gradient_checkpointing is None else gradient_checkpointing
        self.backbone = attach_lora(
            base,
            r=lora_r,
            alpha=lora_alpha,
            dropout=lora_dropout,
            target_modules=lora_target_modules or ["q_proj", "v_proj"],
            quantized=self.quantized,
            gradient_checkpointing=checkpointing,
        )
        # Checkpoints carry only the LoRA weights; the frozen base is reloaded from model_name.
        self._adapter_enabled = True
        self._adapter_switch = AdapterSwitch(self.backbone)
        self._resumed_random_states: list[dict] | None = None  # from a checkpoint, applied when training starts
        # predict's scorer per prompt prefix (the k-shot prompt has its own)
        self._scorers: dict[tuple[int, ...], LabelScorer] = {}
        self.backbone.train()  # from_pretrained returns eval mode; LoRA dropout must be active in fit
        self.strict_loading = False
        num_classes = len(self.label_names)
        self.val_metrics = _metrics(num_classes).clone(prefix="val/")
        self.test_metrics = _metrics(num_classes).clone(prefix="test/")
        # The epoch loss is a torchmetrics mean (sums of loss x examples and of examples, summed across processes):
        # exact under DDP even when ranks hold unequal numbers of eval examples, where Lightning's own sync_dist
        # mean floors the integer example count (Lightning-AI/pytorch-lightning#21859, open in 2.6).
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ---- forward ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter(self, enabled: bool) -> Iterator[None]:
        """The one switch of the LoRA adapter: inside `with module.adapter(False):` the module is the true base model
        (the zero-shot model; peft injects LoRA in place, so a plain forward would include it). Evaluation, SHAP and
        prediction all read a model through this."""
        if enabled == self._adapter_enabled:
            yield
            return
        if enabled:
            raise RuntimeError("the adapter cannot be enabled inside a block that disabled it")
        with self._adapter_switch.off():
            self._adapter_enabled = False
            try:
                yield
            finally:
                self._adapter_enabled = True

    def label_position_logits(self, batch: dict) -> torch.Tensor:
        """Full-vocabulary logits at the position that predicts the label token, (batch, vocab)."""
        return logits_at_positions(
            self.backbone, batch["input_ids"], batch["label_position"] - 1, attention_mask=batch["attention_mask"]
        )

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.label_position_logits(batch).float()
        rows = torch.arange(len(logits), device=logits.device)
        targets = batch["labels"][rows, batch["label_position"]]
        loss = F.cross_entropy(logits, targets)
        label_probs = torch.softmax(logits[:, self.label_token_ids], dim=-1)
        return loss, label_probs

    def on_train_start(self) -> None:
        # Lightning keeps whatever mode modules were left in (e.g. eval after scoring); LoRA dropout and the
        # bitsandbytes training kernels need train mode, so training always starts from it.
        self.backbone.train()
        # A resumed fit draws the dropout masks the uninterrupted one would have drawn: the generators continue
        # from the checkpoint (set here, after the sanity-check validation, which draws nothing anyway).
        if self._resumed_random_states is not None:
            by_rank = self._resumed_random_states
            # Each process continues its own generators; with another number of processes, rank 0's.
            rank = self.global_rank if len(by_rank) == self.trainer.world_size else 0
            restore_random_states(by_rank[rank], self.device)
            self._resumed_random_states = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        # sync_dist: under DDP the logged step loss is the mean over all processes' batches (one small all-reduce
        # per step), so the curve matches a single process with the same global batch; alone it is a no-op.
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        return loss

    def _eval_step(self, batch: dict, metrics: MetricCollection, loss_metric: MeanMetric, stage: str) -> None:
        loss, probs = self._step(batch)
        metrics.update(probs, batch["class_index"])
        loss_metric.update(loss, weight=len(batch["input_ids"]))
        self.log(f"{stage}/loss", loss_metric, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss, "test")

    def on_predict_epoch_start(self) -> None:
        self._scorers = {}  # the adapter may have been switched or reloaded since the last predict

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Label-token scores, the prompt prefix computed once; run `trainer.predict` inside `module.adapter(False)`
        for the zero-shot model."""
        prefix_length = int(batch["prefix_length"][0])
        if not bool((batch["prefix_length"] == prefix_length).all()):
            raise ValueError("a predict batch mixes prompt prefixes")
        prefix = tuple(batch["input_ids"][0, :prefix_length].tolist())
        continuations = [
            row[prefix_length:position].tolist() for row, position in zip(batch["input_ids"], batch["label_position"])
        ]
        if prefix not in self._scorers:
            # The first batch of an epoch is the largest: every batch then runs as one forward.
            self._scorers[prefix] = LabelScorer(
                self.backbone, prefix, self.label_token_ids.tolist(), batch_size=len(continuations)
            )
        scores = self._scorers[prefix](continuations)
        return {
            "index": batch["index"].cpu().numpy(),
            "class_index": batch["class_index"].cpu().numpy(),
            "probabilities": scores.probabilities,
            "label_space_mass": scores.label_space_mass,
            "top_token_is_label": scores.top_token_is_label,
        }

    def _log_epoch(self, metrics: MetricCollection, stage: str) -> None:
        values = metrics.compute()
        self.last_confusion_matrix = values.pop(f"{stage}/confusion_matrix").cpu().tolist()
        per_class = values.pop(f"{stage}/f1_per_class")
        # torchmetrics already synced these across processes (every rank holds the global value), so the mean that
        # sync_dist takes changes nothing; it keeps every epoch-level value on the same footing.
        self.log(f"{stage}/acc", values.pop(f"{stage}/acc"), prog_bar=True, sync_dist=True)
        for name, value in zip(self.label_names, per_class):
            values[f"{stage}/f1_{name}"] = value
        self.log_dict(values, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, "test")

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.hparams.warmup_ratio * total))
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the adapter only --------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["label_names"] = self.label_names
        checkpoint["label_token_ids"] = self.label_token_ids.tolist()
        # Every process's generators (DDP ranks draw their own dropout masks); only rank 0 writes the file.
        states = random_states(self.device)
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        checkpoint["random_states"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = set(self.trainable_state_dict())
        found = set(checkpoint["state_dict"])
        if found != expected:
            raise UserInputError(
                f"The checkpoint's adapter weights do not match this model ({len(found - expected)} unexpected, "
                f"{len(expected - found)} missing); it was trained with another base model or LoRA settings."
            )
        if checkpoint.get("label_names", self.label_names) != self.label_names:
            raise UserInputError(
                f"The checkpoint was trained on labels {checkpoint['label_names']} but the data has "
                f"{self.label_names}; use the same --data.label_space."
            )
        self._resumed_random_states = checkpoint.get("random_states")  # one entry per process of the saving fit
