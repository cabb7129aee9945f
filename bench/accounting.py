"""What a measured path cost: FLOPs from the token positions the model actually ran, the machine's matmul peak, and
the peak resident memory while the path ran.

FLOPs are counted by hooks on the decoder and the lm_head, so every path (ours, the original recipe, `generate`, a
SHAP value function) is counted the same way, from the shapes it really ran, pads included (a CPU computes them):

    forward = 2 x body parameters x decoder positions         every weight matrix of the decoder layers, no
                                                                embedding; LoRA's A and B only while it is active
            + 2 x vocab x hidden x lm_head positions            only where the lm_head is applied
            + 4 x layers x attention width x keys attended      QK^T and attention x V; a position attends to the
                                                                cached prefix and the causal triangle up to itself
                                                                (or, under a custom 4D mask, what the mask allows)

    fit     = 2 x linear forward + 3 x attention forward + 1 x LoRA forward
A frozen weight's backward computes the activation gradient only (dX = dY W^T: as many FLOPs as its forward), never
the weight gradient; the attention products have no weights, so both of their inputs get gradients (2x their
forward); LoRA's own weights also get weight gradients (+1x, under 1 % of the total here). The usual "3 x forward"
assumes every weight is trained and would overstate a frozen-base LoRA step by about 1.5x.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass
class Work:
    """Token positions one path ran through the model."""

    positions: int = 0  # decoder positions (batch x padded width, summed over forwards)
    keys: int = 0  # keys attended, summed over positions (cached prefix + causal triangle)
    head_positions: int = 0  # positions the lm_head was applied at

    def __sub__(self, other: Work) -> Work:
        return Work(
            self.positions - other.positions, self.keys - other.keys, self.head_positions - other.head_positions
        )


class WorkCounter:
    """Counts the `Work` a causal LM (or its peft wrapper) does while the counter is entered."""

    def __init__(self, model, lora_active: bool = False):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        config = causal_lm.config
        params = dict(self.decoder.named_parameters())
        self.lora_params = sum(p.numel() for name, p in params.items() if "lora_" in name) if lora_active else 0
        self.body_params = sum(
            p.numel() for name, p in params.items() if "embed_tokens" not in name and "lora_" not in name
        )
        self.head_params = self.head.weight.numel()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_width = config.num_attention_heads * head_dim
        self.layers = config.num_hidden_layers
        self.work = Work()
        self._handles: list = []

    def __enter__(self) -> WorkCounter:
        self._handles = [
            self.decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True),
            self.head.register_forward_hook(self._on_head),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_decoder(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        rows, width = ids.shape[:2]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        self.work.positions += rows * width
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # a custom mask (prefix tree): count what it allows
            allowed = mask if mask.dtype == torch.bool else mask == 0
            self.work.keys += int(allowed.sum()) * (rows // allowed.shape[0])
        else:  # causal: the cached prefix, then every earlier position of the row (pads are computed too)
            self.work.keys += rows * (width * past + width * (width + 1) // 2)

    def _on_head(self, module, inputs, output) -> None:
        self.work.head_positions += inputs[0].shape[:-1].numel()

    def snapshot(self) -> Work:
        return replace(self.work)

    def linear_flops(self, work: Work) -> float:
        body = 2.0 * (self.body_params + self.lora_params) * work.positions
        return body + 2.0 * self.head_params * work.head_positions

    def fewest_linear_flops(self, positions: int, ends: int, head_rows: int) -> float:
        """The fewest linear FLOPs that compute exact outputs at `ends` of `positions` distinct prefixes: every
        layer's weights at every position, except the last layer, whose output is read at the ends only; elsewhere
        it needs just its key and value projections (later positions attend to them). Plus `head_rows` rows of the
        lm_head at each end (the label tokens a value function reads)."""
        last = self.last_layer_params
        every_position = self.body_params + self.lora_params - last["all"] + last["keys_values"]
        at_ends = last["all"] - last["keys_values"] + head_rows * self.head.weight.shape[1]
        return 2.0 * (every_position * positions + at_ends * ends)

    @property
    def last_layer_params(self) -> dict:
        """The last decoder layer's weights as `linear_flops` counts them (`all`; LoRA's only while active) and
        those of its key and value projections (`keys_values`; 0 where no `k_proj` / `v_proj` is found)."""
        counted = [
            (name.split(".")[:-1], p.numel())
            for name, p in self.decoder.layers[-1].named_parameters()
            if self.lora_params or "lora_" not in name
        ]
        keys_values = sum(n for parts, n in counted if "k_proj" in parts or "v_proj" in parts)
        return {"all": sum(n for _, n in counted), "keys_values": keys_values}

    def attention_flops(self, work: Work) -> float:
        return 4.0 * self.layers * self.attention_width * work.keys

    def forward_flops(self, work: Work) -> float:
        return self.linear_flops(work) + self.attention_flops(work)

    def fit_flops(self, work: Work) -> float:
        """Forward + backward of a frozen base with LoRA (see the module docstring)."""
        return 2 * self.linear_flops(work) + 3 * self.attention_flops(work) + 2.0 * self.lora_params * work.positions


# ---- the machine ------------------------------------------------------------------------------------------------
def fastest_seconds(run, trials: int = 5, seconds: float = 0.4) -> float:
    """Seconds per call of `run()`: the fastest of `trials` timed loops of about `seconds` each (host noise only adds
    time). Two calls first warm it up and give a first guess at the time per call; they do not count."""
    start = time.perf_counter()
    run()
    run()
    repeats = max(1, int(seconds / max((time.perf_counter() - start) / 2, 1e-6)))
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, trials: int = 5, seconds: float = 0.4) -> float:
    """Best achieved GFLOP/s of a size x size torch.matmul loop over `trials` timed loops of about `seconds` each."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    return 2.0 * size**3 / fastest_seconds(lambda: torch.matmul(a, b, out=out), trials, seconds) / 1e9


def layer_matmul_gflops(
    layer: torch.nn.Module, dtype: torch.dtype, rows: tuple[int, ...] = (512, 1024, 2048), seconds: float = 0.3
) -> float:
    """Best achieved GFLOP/s of one decoder layer's own linear products as the model runs them (every 2-D weight
    but LoRA's, one `F.linear` each, on random inputs of `rows` rows), over the row counts in `rows`: the rate a
    path that computes this layer's products one weight at a time reaches at best on this machine."""
    weights = [p.detach().to(dtype) for name, p in layer.named_parameters() if p.dim() == 2 and "lora_" not in name]
    flops_per_row = 2.0 * sum(w.numel() for w in weights)

    def products(inputs: dict[int, torch.Tensor]) -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    best = 0.0
    for count in rows:
        inputs = {w.shape[1]: torch.randn(count, w.shape[1]).to(dtype) for w in weights}
        products(inputs)  # warm-up
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < seconds:
            products(inputs)
            calls += 1
        best = max(best, flops_per_row * count * calls / (time.perf_counter() - start))
    return best / 1e9


# ---- memory: foundation.memory, and a child process's own peak ----------------------------------------------------
# A child spawned from this process inherits this process's resident high-water mark: Linux carries the peak of the
# (v)forked image over the exec into the child's `ru_maxrss`, so wait4 would report at least this parent's peak. A small
# launcher in between (what /usr/bin/time does) starts the measured command from a fresh, small image.
_LAUNCHER = """
import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
fields = ("ru_maxrss", "ru_utime", "ru_stime", "ru_minflt")
open(sys.argv[1], "w").write(json.dumps({name: getattr(usage, name) for name in fields}))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_with_usage(command: list[str], **popen) -> tuple[int, float, dict]:
    """Run `command` (its argv) in its own process: exit code, seconds, and its own resource usage: peak resident set
    in GiB, user and system CPU seconds, minor page faults (empty if the launcher could not report them)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "usage"
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", _LAUNCHER, str(report), *command], **popen)
        seconds = time.perf_counter() - start
        usage = json.loads(report.read_text()) if report.is_file() else {}
    if not usage:
        return code, seconds, {}
    return (
        code,
        seconds,
        {
            "peak_rss_gib": usage["ru_maxrss"] / 2**20,  # KiB on Linux
            "user_s": usage["ru_utime"],
            "sys_s": usage["ru_stime"],
            "minor_faults": usage["ru_minflt"],
        },
    )


def run_measured(command: list[str], **popen) -> tuple[int, float, float]:
    """Run `command` (its argv) in its own process: exit code, its own peak resident set in GiB, seconds."""
    code, seconds, usage = run_with_usage(command, **popen)
    return code, usage.get("peak_rss_gib", 0.0), seconds


def cpu_model() -> str:
    """The CPU's model name, which every benchmark table names."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"
