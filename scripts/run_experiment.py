"""The original experiment in one command: fine-tune, evaluate, explain, report.

`python scripts/run_experiment.py --finetune --run-shap --output-dir outputs/tweet_sentiment_extraction`
(the offline default: add `--model-name embedded:smollm2-135m-instruct --dataset-name embedded:crowdflower-tweets
--no-load-in-4bit`). The flags are the original script's, with its names and defaults.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.commands import experiment_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(experiment_main(fresh_process_after_fit=True))
