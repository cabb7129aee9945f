"""SHAP explanations of baselines and the fine-tuned model on the first N eval tweets, with statistics.

`python scripts/analyze.py --config configs/embedded.yaml --adapter outputs/embedded/lora_adapter
--output-dir outputs/embedded/analysis` (or `python -m analysis` with the same flags); `--help` lists every option,
`--print_config` prints the configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.commands import analyze_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(analyze_main())
