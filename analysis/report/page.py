"""`report.html`: one self-contained page over a run's output folder, built from the files the run wrote.

The page needs no network: CSS is inline, figures and the badge are base64 data URIs, the token heatmaps of
`explanations.html` are embedded through `srcdoc`, and a Content-Security-Policy forbids loading anything else.
There are no scripts. Every string that comes from data (tweets, tokens, label names, notes, paths) is escaped.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Collection, Sequence
from html import escape
from pathlib import Path

from analysis.models import MODEL_ORDER
from analysis.models import display_name as model_display_name
from foundation.atomic_files import write_text_atomic
from foundation.output_names import (
    AGREEMENT_PLOT,
    BADGE_FILE,
    COMPARISON_FILE,
    CONFUSION_PLOT,
    DELETION_PLOT,
    EXPLANATIONS_FILE,
    INTERPRETABILITY_FILE,
    MANIFEST_FILE,
    METRICS_PLOT,
    RELIABILITY_PLOT,
    REPORT_FILE,
    ROAR_COMPARISON_PLOT,
    ROAR_METRICS_FILE,
    ROAR_RESULTS_FILE,
    SEED_METRICS_FILE,
    XAI_PROPERTIES_FILE,
    metrics_file,
    shap_summary_plot,
)

FIGURES = (
    (METRICS_PLOT, "Headline metrics with 95 % bootstrap CIs"),
    (CONFUSION_PLOT, "Confusion matrices"),
    (RELIABILITY_PLOT, "Reliability diagram"),
    *(
        (shap_summary_plot(model), f"{model_display_name(model).capitalize()}: top features by total |SHAP|")
        for model in MODEL_ORDER
    ),
    (DELETION_PLOT, "Faithfulness: deletion curves"),
    (AGREEMENT_PLOT, "Agreement between explainers: mean Spearman per tweet, per model"),
)
HEADLINE = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("macro_recall", "macro recall"),
    ("mcc", "MCC"),
    ("ece", "ECE (15 bins)"),
    ("mean_max_probability", "mean max probability"),
    ("positive_probability_mean", "mean positive probability"),
    ("label_space_mass", "label-space mass"),
    ("format_compliance", "format compliance"),
    ("n_examples", "examples"),
)
EXPLANATION_STATISTICS = (
    ("mean_abs_importance", "mean |SHAP|"),
    ("std_abs_importance", "std |SHAP|"),
    ("median_abs_importance", "median |SHAP|"),
    ("mean_token_importance_std", "mean per-tweet std"),
    ("mean_gini", "mean Gini sparsity"),
    ("mean_entropy", "mean entropy"),
    ("n_examples", "examples"),
)
PAIRED_STATISTICS = (
    ("cosine_similarity", "cosine similarity"),
    ("top5_overlap", "top-5 overlap"),
    ("top10_overlap", "top-10 overlap"),
    ("top_token_jaccard", "top-token Jaccard"),
    ("pearson", "Pearson r"),
    ("spearman", "Spearman ρ"),
    ("mean_abs_delta", "mean |SHAP| delta (second − first)"),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1.5em 2em; max-width: 72em; color: #111; }
header { display: flex; align-items: center; gap: 1.5em; border-bottom: 2px solid #312e81; padding-bottom: 1em; }
header img { width: 180px; height: 100px; }
h1 { font-size: 1.5em; margin: 0 0 0.3em 0; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d4d4d8; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f5; }
td.num { font-family: ui-monospace, monospace; text-align: right; white-space: nowrap; }
.ci { color: #52525b; font-size: 0.9em; }
figure { margin: 1em 0; }
figure img { max-width: min(100%, 60em); border: 1px solid #e4e4e7; }
figcaption { color: #52525b; font-size: 0.9em; }
.facts td:first-child { font-weight: 600; }
.note { color: #92400e; }
iframe { width: 100%; height: 40em; border: 1px solid #d4d4d8; resize: vertical; }
nav a { margin-right: 1em; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---- formatting -------------------------------------------------------------------------------------------------
def format_number(value) -> str:
    """Floats with 4 decimals, integers as they are, missing or undefined values as `n/a`."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return escape(str(value))


def format_p(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _interval(low, high) -> str:
    if low is None or high is None:
        return ""
    return f' <span class="ci">[{format_number(low)}, {format_number(high)}]</span>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A table whose cells are already HTML (numbers formatted, text escaped by the caller)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i >= numeric_from else f"<td>{cell}</td>" for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def shown_name(model: str, names: dict | None = None) -> str:
    """The run's own name for a model (e.g. `4-shot`) where it recorded one, else the fixed display name."""
    return (names or {}).get(model) or model_display_name(model)


# ---- reading the folder -----------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def metrics_by_model(folder: Path, names: Collection[str]) -> dict[str, dict]:
    """The `<model>_metrics.json` files of the compared models present, in MODEL_ORDER: baselines first, fine-tuned
    last (other `*_metrics.json` files, such as the seed summary, are not models)."""
    found = {}
    for model in MODEL_ORDER:
        if metrics_file(model) in names:
            content = _read_json(folder / metrics_file(model))
            if isinstance(content, dict):
                found[model] = content
    return found


def _recorded_names(metrics: dict[str, dict]) -> dict[str, str]:
    return {model: (values.get("source") or {}).get("display_name") for model, values in metrics.items()}


# ---- sections ---------------------------------------------------------------------------------------------------
def _header(manifest: dict | None, badge_svg: Path | None, models: Sequence[str], names: dict) -> str:
    badge = ""
    if badge_svg is not None and badge_svg.is_file():
        badge = f'<img src="{_data_uri(badge_svg, "image/svg+xml")}" alt="Quantum Pass badge">'
    title = " vs ".join(shown_name(model, names) for model in models).capitalize() or "lora-explain run"
    facts = []
    if manifest:
        model = manifest.get("model") or {}
        options = manifest.get("options") or {}
        title = f"{title}: {model.get('id', '')} on {options.get('dataset_name', '')}"
        badge_id = (manifest.get("badge") or {}).get("badge_id")
        facts = [
            ("Quantum Pass", badge_id),
            ("model", f"{model.get('id')} ({model.get('source')}, revision {model.get('revision')})"),
            ("fine-tuned", options.get("finetune")),
            ("seed", manifest.get("seed")),
            ("git commit", (manifest.get("git") or {}).get("commit")),
            (
                "device",
                (manifest.get("device") or {}).get("cuda_device") or (manifest.get("device") or {}).get("accelerator"),
            ),
            ("started (UTC)", manifest.get("started_at_utc")),
        ]
        for split, fingerprint in (manifest.get("data") or {}).items():
            if isinstance(fingerprint, dict):
                facts.append(
                    (f"{split} data", f"{fingerprint.get('n_examples')} examples, sha256 {fingerprint.get('sha256')}")
                )
    rows = "".join(
        f"<tr><td>{escape(label)}</td><td>{escape(str(value))}</td></tr>" for label, value in facts if value is not None
    )
    return f'<header>{badge}<div><h1>{escape(title)}</h1><table class="facts">{rows}</table></div></header>'


def _metrics_section(metrics: dict[str, dict]) -> str:
    if not metrics:
        return ""
    models, names = list(metrics), _recorded_names(metrics)
    rows = []
    for key, label in HEADLINE:
        if not any(key in values for values in metrics.values()):
            continue
        cells = [escape(label)]
        for model in models:
            values = metrics[model]
            ci = (values.get("confidence_intervals") or {}).get(key) or {}
            cells.append(format_number(values.get(key)) + _interval(ci.get("low"), ci.get("high")))
        rows.append(cells)
    parts = [
        '<section id="metrics"><h2>Classification metrics</h2>',
        "<p>Label read from the label tokens' logits at the answer position; 95 % percentile bootstrap intervals "
        "in brackets.</p>",
        _table(["metric"] + [escape(shown_name(m, names)) for m in models], rows),
    ]
    for model in models:
        per_class = metrics[model].get("per_class") or {}
        if per_class:
            class_rows = [
                [escape(str(name))] + [format_number(row.get(k)) for k in ("precision", "recall", "f1", "support")]
                for name, row in per_class.items()
            ]
            parts.append(f"<h3>{escape(shown_name(model, names))}: per class</h3>")
            parts.append(_table(["label", "precision", "recall", "F1", "support"], class_rows))
        matrix = metrics[model].get("confusion_matrix")
        labels = metrics[model].get("label_names") or list(per_class)
        if matrix and len(labels) == len(matrix):
            matrix_rows = [[escape(str(labels[i]))] + [format_number(c) for c in row] for i, row in enumerate(matrix)]
            parts.append(_table(["gold \\ predicted"] + [escape(str(name)) for name in labels], matrix_rows))
    parts.append("</section>")
    return "\n".join(parts)


def _difference_cell(difference: dict | None) -> str:
    difference = difference or {}
    return format_number(difference.get("difference")) + _interval(difference.get("ci_low"), difference.get("ci_high"))


def _comparison_section(comparison: dict | None) -> str:
    if not comparison:
        return ""
    names = comparison.get("display_names") or {}
    pairs = comparison.get("comparisons") or {}
    reference = escape(shown_name(str(comparison.get("reference", "fine_tuned")), names))
    parts = [
        f'<section id="comparison"><h2>{reference.capitalize()} vs each baseline</h2>',
        f"<p>Paired bootstrap over the same {format_number(comparison.get('n_examples'))} examples; exact McNemar "
        "test on the two models' correctness, with Holm-adjusted p-values across the comparisons.</p>",
    ]
    for pair in pairs.values():
        baseline = escape(shown_name(str(pair.get("baseline")), names))
        model = escape(shown_name(str(pair.get("model")), names))
        rows = [
            [
                escape(name),
                format_number(d.get("baseline_value")),
                format_number(d.get("model_value")),
                _difference_cell(d),
            ]
            for name, d in (pair.get("differences") or {}).items()
        ]
        parts.append(f"<h3>{model} vs {baseline}</h3>")
        parts.append(_table(["metric", baseline, model, f"{model} − {baseline} [95 % CI]"], rows))
        mcnemar = pair.get("mcnemar")
        if mcnemar:
            parts.append(
                f"<p>Exact McNemar test: p = {format_p(mcnemar.get('p_value'))} (Holm-adjusted "
                f"{format_p(mcnemar.get('p_value_holm'))}; {format_number(mcnemar.get('n_discordant'))} discordant "
                f"pairs: {format_number(mcnemar.get('b_only_first_correct'))} only {baseline} correct, "
                f"{format_number(mcnemar.get('c_only_second_correct'))} only {model} correct).</p>"
            )
    parts.append("</section>")
    return "\n".join(parts)


def _figure(folder: Path, name: str, caption: str) -> str:
    return (
        f'<figure><img src="{_data_uri(folder / name, "image/png")}" alt="{escape(caption)}">'
        f'<figcaption>{escape(caption)} (<a href="{escape(name)}">{escape(name)}</a>)</figcaption></figure>'
    )


def _figures_section(folder: Path, names: Collection[str]) -> str:
    known = dict(FIGURES)
    pngs = [name for name, _ in FIGURES if name in names]
    shown_elsewhere = {*known, ROAR_COMPARISON_PLOT}  # the ROAR curves sit beside their table
    pngs += sorted(name for name in names if name.endswith(".png") and name not in shown_elsewhere)
    if not pngs:
        return ""
    parts = ['<section id="figures"><h2>Figures</h2>']
    parts += [_figure(folder, name, known.get(name, name)) for name in pngs]
    parts.append("</section>")
    return "\n".join(parts)


def _explanations_section(
    interpretability: dict | None, explanations_page: str | None, properties: dict | None = None
) -> str:
    if not interpretability and not explanations_page:
        return ""
    parts = ['<section id="explanations"><h2>Explanations (SHAP over the tweet\'s words or tokens)</h2>']
    if interpretability:
        models = [k for k, v in interpretability.items() if isinstance(v, dict) and "mean_abs_importance" in v]
        k_shot = (interpretability.get("settings") or {}).get("k_shot")
        names = {model: model_display_name(model, k_shot) for model in models}
        additivity = interpretability.get("additivity") or {}
        settings = interpretability.get("settings") or {}
        parts.append(
            f"<p>{format_number(interpretability.get('n_examples'))} tweets explained with max_evals "
            f"{format_number(settings.get('max_evals'))}, target class: {escape(str(settings.get('target')))}; "
            f"largest additivity error |base + Σ SHAP − f(x)| = {format_p(additivity.get('max_abs_error'))}.</p>"
        )
        rows = [
            [escape(label)] + [format_number(interpretability[m].get(key)) for m in models]
            for key, label in EXPLANATION_STATISTICS
        ]
        parts.append(_table(["statistic"] + [escape(shown_name(m, names)) for m in models], rows))
        for model in models:
            top = interpretability[model].get("top_tokens") or []
            listed = ", ".join(
                f"{escape(str(row.get('token')))} ({format_number(row.get('total_abs'))})" for row in top[:10]
            )
            features = escape(str(settings.get("features", "tokens")))
            parts.append(f"<p><b>{escape(shown_name(model, names))}</b> top {features}: {listed}</p>")
        target = interpretability.get("target") or {}
        if target.get("comparison_target"):
            parts.append(
                f"<p>Every comparison of two models reads one class per tweet: "
                f"<b>{escape(str(target['comparison_target']))}</b> (same-target fraction "
                f"{', '.join(format_number(v) for v in (target.get('same_target_fraction') or {}).values())}).</p>"
            )
        for comparison in (interpretability.get("comparisons") or {}).values():
            parts.append(_paired_statistics(comparison, names))
        for effect in (interpretability.get("fine_tuning_effect") or {}).values():
            parts.append(_fine_tuning_effect(effect, names))
        parts.append(_seed_null(interpretability.get("seed_null")))
        parts.append(_faithfulness(interpretability.get("faithfulness"), models, names))
        parts.append(_explainer_agreement(interpretability.get("explainer_agreement"), names))
        parts.append(_explainer_verdicts(interpretability.get("explainer_verdicts")))
        parts.append(_xai_properties(properties, names))
        notes = interpretability.get("notes") or []
        if notes:
            parts.append("<ul>" + "".join(f'<li class="note">{escape(str(note))}</li>' for note in notes) + "</ul>")
    if explanations_page:
        parts.append(
            f'<h3>Token heatmaps (<a href="{EXPLANATIONS_FILE}">{EXPLANATIONS_FILE}</a>)</h3>'
            f'<iframe title="token heatmaps" srcdoc="{escape(explanations_page, quote=True)}"></iframe>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def _paired_statistics(comparison: dict | None, names: dict) -> str:
    if not comparison:
        return ""
    first, second = comparison.get("models") or ("zero_shot", "fine_tuned")
    a, b = shown_name(first, names), shown_name(second, names)
    rows = []
    for key, label in PAIRED_STATISTICS:
        stat = comparison.get(key)
        if isinstance(stat, dict):
            rows.append(
                [escape(label), format_number(stat.get("mean")) + _interval(stat.get("ci_low"), stat.get("ci_high"))]
            )
    for key, label in (
        ("pooled_pearson", "pooled Pearson r"),
        ("pooled_spearman", "pooled Spearman ρ"),
        ("mean_abs_importance_difference", "mean |SHAP| difference (second − first)"),
        ("cohens_d_abs_importance", "Cohen's d of |SHAP|"),
        ("overall_top_token_jaccard", "overall top-token Jaccard"),
    ):
        if key in comparison:
            rows.append([escape(label), format_number(comparison.get(key))])
    parts = [
        f"<h3>{escape(a).capitalize()} (first) vs {escape(b)} (second): explanations</h3>",
        _table(["statistic", "value [95 % CI]"], rows),
    ]
    strata = comparison.get("strata") or {}
    stratum_rows = []
    for name in ("both_correct", "fixed", "broken", "both_wrong"):
        stratum = strata.get(name)
        if not isinstance(stratum, dict):
            continue
        cells = [escape(name.replace("_", " ")), format_number(stratum.get("n_examples"))]
        for key in ("cosine_similarity", "spearman", "top5_overlap"):
            stat = stratum.get(key)
            if isinstance(stat, dict):
                cells.append(format_number(stat.get("mean")) + _interval(stat.get("ci_low"), stat.get("ci_high")))
            else:
                cells.append(escape(str(stratum.get("note", "–"))))
        stratum_rows.append(cells)
    if stratum_rows:
        parts.append(
            f"<p>By stratum ({escape(str(strata.get('definition', '')))}):</p>"
            + _table(["tweets", "n", "cosine [95 % CI]", "Spearman", "top-5 overlap"], stratum_rows)
        )
    tests = comparison.get("paired_tests") or {}
    if tests:
        test_rows = [
            [
                escape(name),
                format_number(t.get(f"{first}_mean")),
                format_number(t.get(f"{second}_mean")),
                format_number(t.get("mean_difference")) + _interval(t.get("ci_low"), t.get("ci_high")),
                format_p(t.get("wilcoxon_p")),
                format_number(t.get("cohens_d")),
            ]
            for name, t in tests.items()
        ]
        parts.append(
            _table(
                ["per-tweet statistic", escape(a), escape(b), f"{escape(b)} − {escape(a)} [95 % CI]", "Wilcoxon p"]
                + ["Cohen's d"],
                test_rows,
            )
        )
    return "\n".join(parts)


def _seed_null(null: dict | None) -> str:
    """One verdict per agreement statistic: zero-shot vs fine-tuned against two fine-tuned seeds."""
    if not null:
        return ""
    items = "".join(f"<li>{escape(str(row.get('verdict')))}</li>" for row in (null.get("statistics") or {}).values())
    return (
        f"<h3>Seed-noise null ({format_number(null.get('seeds'))} fine-tuned seeds, gold class)</h3>"
        f"<p>Agreement of zero-shot with fine-tuned explanations against the agreement of two fine-tuned seeds "
        f"(paired over {format_number(null.get('n_examples'))} tweets):</p><ul>{items}</ul>"
    )


def _seed_metrics_section(seed_metrics: dict | None) -> str:
    if not seed_metrics:
        return ""
    rows = [
        [
            escape(name),
            format_number(row.get("mean")),
            format_number(row.get("sd")),
            f"[{format_number(row.get('min'))}, {format_number(row.get('max'))}]",
        ]
        for name, row in (seed_metrics.get("metrics") or {}).items()
    ]
    seeds = ", ".join(str(seed) for seed in seed_metrics.get("seeds") or [])
    return (
        f'<section id="seeds"><h2>Fine-tuned over training seeds {escape(seeds)}</h2>'
        + _table(["metric", "mean", "sd", "range"], rows)
        + "</section>"
    )


def _fine_tuning_effect(effect: dict | None, names: dict) -> str:
    """Words whose importance the second model raised or lowered most against the first, with CIs."""
    if not effect:
        return ""
    first, second = effect.get("models") or ("zero_shot", "fine_tuned")
    a, b = shown_name(first, names), shown_name(second, names)
    parts = [
        f"<h3>What changed from {escape(a)} to {escape(b)}: Δφ = φ({escape(b)}) − φ({escape(a)})</h3>",
        f"<p>Per word type over the tweets it occurs in (at least {format_number(effect.get('min_tweets'))}); "
        f"largest additivity error |Σ Δφ − (Δf(x) − Δf(∅))| = {format_p(effect.get('max_additivity_error'))}.</p>",
    ]
    for key, label in (("raised", "raised most"), ("lowered", "lowered most")):
        rows = [
            [
                escape(str(row.get("word"))),
                format_number(row.get("n_tweets")),
                format_number(row.get("mean_delta")) + _interval(row.get("ci_low"), row.get("ci_high")),
                format_number(row.get("mean_first")),
                format_number(row.get("mean_second")),
            ]
            for row in effect.get(key) or []
        ]
        if rows:
            parts.append(
                f"<p>{escape(label)}:</p>"
                + _table(["word", "tweets", "mean Δφ [95 % CI]", f"mean φ {escape(a)}", f"mean φ {escape(b)}"], rows)
            )
    return "\n".join(parts)


def _mean_cell(stat: dict | None) -> str:
    stat = stat or {}
    return format_number(stat.get("mean")) + _interval(stat.get("ci_low"), stat.get("ci_high"))


def _explainer_agreement(agreement: dict | None, names: dict) -> str:
    """Per model, the Spearman (and top-5 overlap) of every two explainers as a matrix."""
    if not agreement:
        return ""
    parts = ["<h3>Agreement between explainers (per tweet, the model's own class; mean [95 % CI])</h3>"]
    for model, pairs in agreement.items():
        explainers = list(dict.fromkeys(e for row in pairs.values() for e in row["explainers"]))
        cells = {tuple(row["explainers"]): row for row in pairs.values()}
        rows = []
        for a in explainers:
            row = [escape(a)]
            for b in explainers:
                pair = cells.get((a, b)) or cells.get((b, a))
                if a == b:
                    row.append("1")
                elif pair:
                    row.append(
                        _mean_cell(pair["spearman"]) + f"<br>top-5 {format_number(pair['top5_overlap'].get('mean'))}"
                    )
                else:
                    row.append("–")
            rows.append(row)
        parts.append(
            f"<p>{escape(shown_name(model, names)).capitalize()}: Spearman ρ and top-5 overlap</p>"
            + _table(["explainer"] + [escape(e) for e in explainers], rows)
        )
    return "\n".join(parts)


def _explainer_verdicts(verdicts: dict | None) -> str:
    """Each model comparison under every explainer: does the conclusion depend on the method?"""
    if not verdicts:
        return ""
    parts = ["<h3>The comparison under each explainer (common target)</h3>"]
    for comparison in verdicts.values():
        items = "".join(f"<li>{escape(str(row['verdict']))}</li>" for row in comparison["explainers"].values())
        parts.append(f"<p>{escape(str(comparison['conclusion'])).capitalize()}.</p><ul>{items}</ul>")
    return "\n".join(parts)


def _xai_properties(properties: dict | None, names: dict) -> str:
    """Per model, every measured property of every explainer (mean [95 % CI] over tweets)."""
    if not properties:
        return ""
    definitions = properties.get("definitions") or {}
    parts = [
        f'<h3>XAI properties, measured (<a href="{XAI_PROPERTIES_FILE}">{XAI_PROPERTIES_FILE}</a>)</h3>',
        "<ul>" + "".join(f"<li><b>{escape(k)}</b>: {escape(str(v))}</li>" for k, v in definitions.items()) + "</ul>",
    ]
    for key, why in (properties.get("not_measured") or {}).items():
        parts.append(f'<p class="note">{escape(key)} not measured: {escape(why)}</p>')
    for model, explainers in (properties.get("models") or {}).items():
        keys = [k for k in definitions if any(k in row for row in explainers.values())]
        rows = [[escape(e)] + [_mean_cell(row.get(k)) for k in keys] for e, row in explainers.items()]
        parts.append(
            f"<p>{escape(shown_name(model, names)).capitalize()}:</p>"
            + _table(["explainer"] + [escape(k.replace("_", " ")) for k in keys], rows)
        )
    return "\n".join(parts)


def _faithfulness(faithfulness: dict | None, models: Sequence[str], names: dict) -> str:
    if not faithfulness:
        return ""
    rows = []
    for model in models:
        summary = faithfulness.get(model) or {}
        for mode in ("comprehensiveness", "sufficiency"):
            ours, random = summary.get(mode) or {}, summary.get(f"{mode}_random") or {}
            if ours:
                rows.append(
                    [
                        escape(f"{shown_name(model, names)}: {mode}"),
                        format_number(ours.get("mean_aopc")) + _interval(ours.get("ci_low"), ours.get("ci_high")),
                        format_number(random.get("mean_aopc")) + _interval(random.get("ci_low"), random.get("ci_high")),
                    ]
                )
    if not rows:
        return ""
    return "<h3>Faithfulness (AOPC)</h3>" + _table(["model: mode", "SHAP order", "random order"], rows)


def _roar_section(metrics: dict | None, analysis: dict | None, folder: Path, names: Collection[str]) -> str:
    """ROAR: every retrained condition's scores, each explainer's drop against random removal of the same share, the
    learning check that says whether those drops can mean anything, and the curves."""
    conditions = (metrics or {}).get("conditions") or {}
    if not conditions:
        return ""
    analysis = analysis or {}
    source = metrics.get("source") or {}
    by_condition = {
        row.get("condition"): row for shares in (analysis.get("explainers") or {}).values() for row in shares.values()
    }
    rows = []
    for name, row in conditions.items():
        ci = row.get("confidence_intervals") or {}
        removed = row.get("removed_share") or {}
        versus = by_condition.get(name) or {}
        against = versus.get("vs_random") or {}
        rows.append(
            [
                escape(name),
                escape(str(versus.get("verdict", ""))),
                " / ".join(f"{100 * removed[s]:.0f} %" if s in removed else "n/a" for s in ("train", "test")),
                *(
                    format_number(row.get(key))
                    + _interval((ci.get(key) or {}).get("low"), (ci.get(key) or {}).get("high"))
                    for key in ("accuracy", "macro_f1")
                ),
                *((_difference_cell(against.get(key)) for key in ("accuracy", "macro_f1")) if versus else ("", "")),
                format_p(against.get("mcnemar_p_value")) if versus else "",
            ]
        )
    first = next(iter(conditions.values()))
    model = model_display_name(str(source.get("explained_model", "")))
    explainers = ", ".join(str(e) for e in source.get("explainers") or [])
    parts = [
        '<section id="roar"><h2>ROAR: remove and retrain</h2>',
        f"<p>The {escape(model)} model explained every tweet with {escape(explainers)} at its "
        f"{escape(str(source.get('target')))} class; each condition removes that share of each tweet's words of "
        f"largest |attribution| (<code>random</code>: as many chosen at random; <code>none</code>: nothing) from the "
        f"{format_number(first.get('n_train'))} training and {format_number(first.get('n_eval'))} evaluation tweets, "
        "retrains a fresh LoRA adapter with the run's recipe and seed and scores it. 95 % bootstrap intervals over the "
        "evaluation tweets in brackets; one training seed, so they do not include the retraining noise (files: "
        f'<a href="{ROAR_METRICS_FILE}">{ROAR_METRICS_FILE}</a>, '
        f'<a href="{ROAR_RESULTS_FILE}">{ROAR_RESULTS_FILE}</a>).</p>',
    ]
    check = analysis.get("learning_check") or {}
    if check and not check.get("learned"):
        parts.append(
            f'<p class="note">Warning: retrained on the unchanged tweets (<code>none</code>) the adapter reaches '
            f"accuracy {format_number(check.get('none_accuracy'))} (CI low {format_number(check.get('none_ci_low'))}), "
            f"not above the most frequent class's share of the evaluation tweets "
            f"({format_number(check.get('majority_share'))}): the recipe has not learned the task at these sizes, so "
            "the differences below measure noise, not the explainer.</p>"
        )
    header = ["condition", "verdict", "words removed (train / eval)", "accuracy", "macro-F1"]
    header += ["vs random: accuracy", "vs random: macro-F1", "McNemar p (vs random)"]
    parts.append(_table(header, rows, numeric_from=2))
    if ROAR_COMPARISON_PLOT in names:
        parts.append(_figure(folder, ROAR_COMPARISON_PLOT, "ROAR: accuracy and macro-F1 against the share removed"))
    parts.append("</section>")
    return "\n".join(parts)


def _timings_section(manifest: dict | None) -> str:
    if not manifest:
        return ""
    phases = manifest.get("phase_seconds") or {}
    peaks = manifest.get("peak_rss_gib") or {}
    rows = [
        [escape(name), format_number(float(seconds)), format_number(peaks[name]) if name in peaks else "—"]
        for name, seconds in phases.items()
    ]
    versions = manifest.get("packages") or {}
    version_rows = [[escape(name), escape(str(version))] for name, version in versions.items()]
    return (
        '<section id="run"><h2>Run</h2>'
        + _table(["phase", "seconds", "peak resident GiB so far"], rows)
        + "<details><summary>package versions</summary>"
        + _table(["package", "version"], version_rows, numeric_from=2)
        + "</details></section>"
    )


def _files_section(folder: Path, names: Collection[str]) -> str:
    items = []
    for name in sorted(names):
        path = folder / name
        size = f"{path.stat().st_size:,} bytes" if path.is_file() else "folder"
        href = escape(name + ("/" if path.is_dir() else ""), quote=True)
        items.append(f'<li><a href="{href}">{escape(name)}</a> <span class="ci">({size})</span></li>')
    return f'<section id="files"><h2>Raw files</h2><ul>{"".join(items)}</ul></section>'


# ---- the page ---------------------------------------------------------------------------------------------------
def render_report(folder: str | Path, names: Collection[str] | None = None, badge_svg: Path | None = None) -> str:
    """The report page for the run in `folder`, using only the files in `names` (default: all in the folder)."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name != REPORT_FILE]
    names = set(names)

    def load(name: str):
        return _read_json(folder / name) if name in names else None

    manifest = load(MANIFEST_FILE)
    explanations_page = (folder / EXPLANATIONS_FILE).read_text(encoding="utf-8") if EXPLANATIONS_FILE in names else None
    metrics = metrics_by_model(folder, names)
    sections = {
        "metrics": _metrics_section(metrics),
        "comparison": _comparison_section(load(COMPARISON_FILE)),
        "figures": _figures_section(folder, names),
        "seeds": _seed_metrics_section(load(SEED_METRICS_FILE)),
        "explanations": _explanations_section(
            load(INTERPRETABILITY_FILE), explanations_page, load(XAI_PROPERTIES_FILE)
        ),
        "roar": _roar_section(load(ROAR_METRICS_FILE), load(ROAR_RESULTS_FILE), folder, names),
        "run": _timings_section(manifest),
        "files": _files_section(folder, names),
    }
    nav = "".join(f'<a href="#{anchor}">{anchor}</a>' for anchor, html in sections.items() if html)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            "<title>lora-explain report</title>",
            f"<style>{STYLE}</style></head><body>",
            _header(manifest, badge_svg, list(metrics), _recorded_names(metrics)),
            f"<nav>{nav}</nav>",
            *[html for html in sections.values() if html],
            "</body></html>",
        ]
    )


def write_report(folder: str | Path, names: Collection[str] | None = None, badge_svg: Path | None = None) -> Path:
    """Write `report.html` into `folder` atomically; returns its path."""
    return write_text_atomic(Path(folder) / REPORT_FILE, render_report(folder, names, badge_svg) + "\n")


def write_folder_report(folder: str | Path) -> Path:
    """`report.html` over every file in `folder`, with the badge where the folder holds one: the page evaluate.py,
    analyze.py and roar.py leave (a one-command run writes its own, over the files it produced)."""
    folder = Path(folder)
    return write_report(folder, badge_svg=folder / BADGE_FILE)
