"""`dtype: auto`: the one policy that picks the weights / compute dtype of each phase (fit, evaluation, explain).

bf16 only where this machine computes it natively **and** the bf16 gates measured for this model on this kind of
machine passed; fp32 otherwise. The gates are measurements, not assumptions: `make bench` (bench/bench_all.py)
measures them and records them in `assets/dtype_gates.json`, one record per model and kind of hardware:

- fit: the bf16-fitted adapter's accuracy and macro-F1 on the demo's eval set lie inside the fp32-fitted adapter's
  95 % bootstrap CIs, and the two adapters' mean eval losses differ by < 0.02;
- evaluation: bf16 predictions equal fp32's on >= 99 % of the gate's eval examples;
- explain: bf16 SHAP values correlate with fp32's at Pearson r >= 0.99 (target-class values).

A kind of hardware is `cuda:<device name>`, `cpu:amx_bf16` (Intel AMX), `cpu:avx512_bf16` or `cpu:no_bf16`; a
machine of a kind without a record runs fp32 and says so. Each choice comes with its reason, which `run.json`
records. `LORA_EXPLAIN_DTYPE_GATES` names another record file (empty: none, so `auto` is fp32; the tests use that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

GATES_FILE = Path(__file__).resolve().parents[1] / "assets" / "dtype_gates.json"
GATES_ENV = "LORA_EXPLAIN_DTYPE_GATES"
PHASES = ("fit", "evaluation", "explain")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


# Lightning's `--trainer.precision` values under which a fit's products run in another dtype than the weights'.
AUTOCAST = {"bf16-mixed": "bfloat16", "bf16": "bfloat16", "16-mixed": "float16", "16": "float16"}
CAST = {"bf16-true": "bfloat16", "16-true": "float16"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # float32, bfloat16 or float16: the weights' dtype (and the products', without autocast)
    reason: str
    requested: str = "auto"  # what --model.dtype said: a command that runs another phase resolves it anew
    emulated: bool = False  # bf16 requested where the hardware only emulates it: a warning, not an error
    precision: str | None = None  # the fit's --trainer.precision, where it changes the dtype the products run in

    @property
    def computes_in(self) -> str:
        """The dtype the matrix products run in: the weights' dtype, or the one the trainer's precision imposes."""
        return AUTOCAST.get(self.precision) or CAST.get(self.precision) or self.dtype

    def describe(self) -> str:
        if self.computes_in == self.dtype:
            return self.dtype
        how = "autocast" if self.precision in AUTOCAST else "weights cast"
        return f"{self.computes_in} ({self.dtype} weights, {how} by --trainer.precision {self.precision})"

    def under_precision(self, precision) -> DtypeChoice:
        """This choice for a fit under Lightning's `--trainer.precision precision` (run.json and the log then say
        what the products ran in: a bf16-mixed fit of fp32 weights computes in bf16)."""
        precision = str(precision) if precision is not None else None
        return replace(self, precision=precision if precision in AUTOCAST or precision in CAST else None)

    def as_dict(self) -> dict:
        record = {"dtype": self.dtype, "reason": self.reason, "requested": self.requested}
        if self.precision is not None:
            record.update(computes_in=self.computes_in, trainer_precision=self.precision)
        return record


def hardware_kind() -> str:
    """What this process computes on, as the gate records name it."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    flags = _cpu_flags()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return f"cpu:{flag}"
    return "cpu:no_bf16"


def native_bf16(kind: str) -> bool:
    if kind.startswith("cuda:"):
        import torch

        return torch.cuda.is_bf16_supported()
    return kind != "cpu:no_bf16"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no native bf16 is assumed
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def gate_records(path: Path | None = None) -> list[dict]:
    """The recorded gates: `path`, else the file `LORA_EXPLAIN_DTYPE_GATES` names (empty: none), else the project's."""
    if path is None:
        named = os.environ.get(GATES_ENV)
        if named is not None and not named.strip():
            return []
        path = Path(named) if named else GATES_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("records", [])


def find_record(records: list[dict], model_name: str, kind: str) -> dict | None:
    """The newest record of `model_name` on `kind` (records are appended, so the last one)."""
    matches = [r for r in records if r.get("model") == model_name and r.get("hardware") == kind]
    return matches[-1] if matches else None


def choose_dtype(requested: str, model_name: str, phase: str, records: list[dict] | None = None) -> DtypeChoice:
    """The dtype `phase` runs in for `--model.dtype requested` (see the module docstring for `auto`)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    kind = hardware_kind()
    if requested != "auto":
        reason = "requested with --model.dtype"
        emulated = requested == "bfloat16" and not native_bf16(kind)
        if emulated:
            reason += f"; {kind} has no native bf16, so torch emulates it, far slower than float32 (auto: float32)"
        return DtypeChoice(requested, reason, requested, emulated)
    if not native_bf16(kind):
        return DtypeChoice("float32", f"auto: {kind} has no native bf16")
    record = find_record(gate_records() if records is None else records, model_name, kind)
    if record is None:
        return DtypeChoice(
            "float32", f"auto: no bf16 gates are recorded for {model_name} on {kind} (make bench measures them)"
        )
    gate = (record.get("gates") or {}).get(phase)
    when = f"measured {record.get('measured', '?')} on {record.get('cpu') or kind}"
    if gate is None:
        return DtypeChoice("float32", f"auto: the bf16 {phase} gate was not measured for {model_name} on {kind}")
    if not gate.get("passes"):
        return DtypeChoice("float32", f"auto: the bf16 {phase} gate failed ({gate.get('summary', '')}; {when})")
    return DtypeChoice("bfloat16", f"auto: the bf16 {phase} gate passed ({gate.get('summary', '')}; {when})")


def record_gates(record: dict, path: Path = GATES_FILE) -> Path:
    """Add `record` (model, hardware, gates, ...) to the record file, replacing an earlier one of the same model,
    hardware and torch version; written atomically."""
    from foundation.atomic_files import write_json_atomic

    records = [
        r
        for r in gate_records(path)
        if (r.get("model"), r.get("hardware"), r.get("torch")) != (record["model"], record["hardware"], record["torch"])
    ]
    return write_json_atomic(path, {"records": [*records, record]})
