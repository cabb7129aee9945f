#!/usr/bin/env bash
# The project's own commands on a GPU, as a Colab user runs them, with a tiny Llama built from a config (no download,
# no internet) and 60 synthetic tweets: the one command with a 4-bit (NF4) LoRA fit, evaluation and three explainers,
# then a bf16 fit and its evaluation. It checks that each command finishes on the GPU and prints what run.json and
# the metrics recorded (device, dtype per phase, accuracy); the numbers of a random tiny model mean nothing.
#
# The lent machine's image lacks some of our dependencies: carry them as wheels in .gpuwheels/ (made on a machine
# with internet: `pip download --no-deps --python-version 3.12 --only-binary=:all: -d .gpuwheels bitsandbytes shap
# slicer lime captum datasets dill multiprocess gguf jsonargparse docstring_parser typeshed_client`; lime is an sdist:
# add `--no-binary=:all: lime`). Usage: bash bench/gpu_run.sh [WORK_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".gpuwheels/*" >/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index --no-build-isolation .gpuwheels/*
fi
work=${1:-/tmp/gpu_run}
rm -rf "$work" && mkdir -p "$work/data"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - "$work" <<'EOF'
import sys
from pathlib import Path

from tests.tiny import save_tiny_llama, synthetic_rows, write_csv, write_tiny_config

work = Path(sys.argv[1])
save_tiny_llama(work / "model")
write_csv(work / "data" / "train.csv", synthetic_rows(48, seed=1))
write_csv(work / "data" / "test.csv", synthetic_rows(24, seed=2))
write_tiny_config(work / "tiny.yaml", str(work / "model"), work / "data", work / "fit")
EOF
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

echo "== the one command: 4-bit LoRA fit, evaluation, explainers"
python3 scripts/run_experiment.py --model-name "$work/model" --dataset-name "$work/data" --load-in-4bit --finetune \
    --train-subset None --baselines zero_shot --shap-example-count 2 \
    --explainers partition occlusion integrated_gradients --no-project-badge --output-dir "$work/run"

echo "== a bf16 fit and its evaluation"
python3 scripts/train.py fit --config "$work/tiny.yaml" --model.dtype bfloat16 --trainer.max_steps 6 \
    --trainer.callbacks+=lightning_modules.export_adapter.ExportAdapter \
    --trainer.enable_progress_bar false
python3 scripts/evaluate.py --config "$work/tiny.yaml" --model.dtype bfloat16 --adapter "$work/fit/lora_adapter" \
    --baselines zero_shot --output-dir "$work/evaluate"

python3 - "$work" <<'EOF'
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
run = json.loads((work / "run" / "run.json").read_text())
print("run.json status:", run["status"], "| phases:", run["phases_done"])
print("  attempts:", [(a["status"], a["pid"]) for a in run["attempts"]])
for phase, choice in run.get("dtypes", {}).items():
    print(f"  {phase}: {choice}")
for folder in ("run", "evaluate"):
    for model in ("zero_shot", "fine_tuned"):
        metrics = json.loads((work / folder / f"{model}_metrics.json").read_text())
        print(f"{folder}/{model}_metrics.json: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
print("files of the one command:", sorted(p.name for p in (work / "run").iterdir()))
EOF
