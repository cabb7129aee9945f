"""Baselines (raw and calibrated zero-shot, k-shot) vs fine-tuned: metrics, predictions and plots.

`python scripts/evaluate.py --config configs/embedded.yaml --adapter outputs/embedded/lora_adapter
--output-dir outputs/embedded/evaluation`; `--help` lists every option, `--print_config` prints the configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.commands import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
