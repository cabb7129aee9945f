"""A self-contained HTML page: each tweet twice (zero-shot, fine-tuned), tokens coloured by target-class SHAP value.

No scripts, fonts or links: the page opens offline. Every piece of tweet text is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #111; }
.example { border-top: 1px solid #ccc; padding: 0.8em 0; }
.model { margin: 0.4em 0 0.4em 1em; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9; }
.tokens span { border-radius: 3px; padding: 1px 0; }
.meta { color: #555; font-size: 0.9em; }
table.probs { border-collapse: collapse; font-size: 0.85em; margin-top: 0.2em; }
table.probs td, table.probs th { padding: 0 0.6em; border: 1px solid #ddd; }
.legend span { padding: 2px 6px; margin-right: 0.5em; }
"""


def token_colour(value: float, scale: float) -> str:
    """Red for evidence for the target class, blue against; opacity proportional to |value| / scale."""
    if scale <= 0 or value == 0:
        return "rgba(0,0,0,0)"
    alpha = min(1.0, abs(value) / scale)
    rgb = "220,38,38" if value > 0 else "37,99,235"
    return f"rgba({rgb},{alpha:.3f})"


def _tokens_html(segments: Sequence[str], values: np.ndarray, scale: float) -> str:
    spans = [
        f'<span style="background:{token_colour(value, scale)}" title="{value:+.5f}">{escape(segment)}</span>'
        for segment, value in zip(segments, values)
    ]
    return "".join(spans)


def _probabilities_html(label_names: Sequence[str], probabilities: Sequence[float]) -> str:
    header = "".join(f"<th>{escape(name)}</th>" for name in label_names)
    cells = "".join(f"<td>{p:.3f}</td>" for p in probabilities)
    return f'<table class="probs"><tr>{header}</tr><tr>{cells}</tr></table>'


def explanations_html(
    records: Sequence[Mapping],
    label_names: Sequence[str],
    display_names: Mapping[str, str],
    title: str,
    differences: Sequence[tuple[str, str]] = (),
) -> str:
    """The page for per-example records (as written by `analysis.explanation.run`): one section per example.

    `differences`: (first, second) model pairs whose difference second - first is shown under the two explanations,
    on the record's common `comparison_target` (the fine-tuning effect: fine-tuned - zero-shot)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        '<p class="legend">Colour: SHAP value of each word or token for the explained (target) class. '
        '<span style="background:rgba(220,38,38,0.6)">for the class</span>'
        '<span style="background:rgba(37,99,235,0.6)">against the class</span> '
        "Opacity is relative to the largest |value| of that tweet across both models; hover a token for its "
        "value. Masked tokens are deleted, so the base value is the prediction for an empty tweet.</p>",
    ]
    for record in records:
        models = record["models"]
        targets = {name: np.asarray(model["values"], dtype=float)[:, model["target"]] for name, model in models.items()}
        scale = max((float(np.abs(v).max()) for v in targets.values() if v.size), default=0.0)
        parts.append('<div class="example">')
        parts.append(
            f"<h3>Example {record['index']}</h3>"
            f'<p class="meta">gold label: <b>{escape(label_names[record["gold"]])}</b></p>'
        )
        for name, model in models.items():
            target = model["target"]
            predicted = model["predicted"]
            base = float(np.asarray(model["base_values"])[target])
            parts.append(
                f'<div class="model"><p class="meta"><b>{escape(display_names.get(name, name))}</b>: '
                f"predicted <b>{escape(label_names[predicted])}</b>; explaining "
                f"<b>{escape(label_names[target])}</b> (base value {base:.3f}, "
                f"f(x) {model['probabilities'][target]:.3f})</p>"
                f'<div class="tokens">{_tokens_html(record["data"], targets[name], scale)}</div>'
                f"{_probabilities_html(label_names, model['probabilities'])}</div>"
            )
        for first, second in differences:
            if first not in models or second not in models or "comparison_target" not in record:
                continue
            t = record["comparison_target"]
            delta = (
                np.asarray(models[second]["values"], dtype=float)[:, t]
                - np.asarray(models[first]["values"], dtype=float)[:, t]
            )
            delta_scale = float(np.abs(delta).max()) if delta.size else 0.0
            parts.append(
                f'<div class="model"><p class="meta"><b>{escape(display_names.get(second, second))} - '
                f"{escape(display_names.get(first, first))}</b>: what fine-tuning changed, on the common class "
                f"<b>{escape(label_names[t])}</b> (sum {delta.sum():+.3f}; own scale)</p>"
                f'<div class="tokens">{_tokens_html(record["data"], delta, delta_scale)}</div></div>'
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
