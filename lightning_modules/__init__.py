from lightning_modules.checkpointing import PeriodicModelCheckpoint
from lightning_modules.classifier import LoRASentimentClassifier
from lightning_modules.export_adapter import ExportAdapter

__all__ = ["ExportAdapter", "LoRASentimentClassifier", "PeriodicModelCheckpoint"]
