"""ROAR (remove and retrain): delete each tweet's top words by an explainer, and as many at random, retrain LoRA.

`python scripts/roar.py --config configs/embedded.yaml --adapter outputs/embedded/lora_adapter --explainer occlusion
--train-subset 200 --eval-subset 200 --output-dir outputs/roar`; `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.commands import roar_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(roar_main())
