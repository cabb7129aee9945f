"""Fit / validate / test the LoRA classifier: `python scripts/train.py fit --config configs/embedded.yaml`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.configuration import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli())
