"""The text the commands print: Markdown tables and summary lines (the README's tables come from here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from analysis.models import display_name
from foundation.output_names import PROGRESS_DIR

if TYPE_CHECKING:
    from analysis.evaluation.run import EvaluationResult
    from analysis.explanation.run import AnalysisResult


def metrics_table(metrics: dict[str, dict]) -> list[str]:
    """A Markdown table of every model's headline metrics with 95 % CIs (the README's table comes from here)."""

    def with_ci(values: dict, name: str) -> str:
        ci = values["confidence_intervals"][name]
        return f"{values[name]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    lines = [
        "| model | accuracy [95% CI] | macro-F1 [95% CI] | MCC | ECE | format compliance | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for values in metrics.values():
        lines.append(
            f"| {values['source']['display_name']} | {with_ci(values, 'accuracy')} | {with_ci(values, 'macro_f1')} "
            f"| {values['mcc']:.3f} | {values['ece']:.3f} | {values['format_compliance']:.3f} "
            f"| {values['n_examples']} |"
        )
    return lines


def comparison_lines(comparison: dict | None) -> list[str]:
    """One line per compared pair: accuracy and macro-F1 differences with CIs, McNemar p (raw and Holm)."""
    if not comparison:
        return []
    names = comparison.get("display_names", {})
    lines = []
    for values in comparison["comparisons"].values():
        model, baseline = names.get(values["model"], values["model"]), names.get(values["baseline"], values["baseline"])
        parts = []
        for metric in ("accuracy", "macro_f1"):
            d = values["differences"][metric]
            parts.append(f"{metric} {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        mcnemar = values["mcnemar"]
        lines.append(
            f"{model} - {baseline}: {', '.join(parts)}; McNemar p = {mcnemar['p_value']:.3g} "
            f"(Holm {mcnemar['p_value_holm']:.3g}, {mcnemar['n_discordant']} discordant)"
        )
    return lines


def evaluation_summary(result: EvaluationResult) -> list[str]:
    """A short human-readable report of a run: headline metrics with CIs, the comparisons, the files."""
    lines = metrics_table(result.metrics) + comparison_lines(result.comparison)
    for stale in result.removed_stale:
        lines.append(f"removed {stale} from an earlier run with other models")
    lines.append(f"results in {result.output_dir}")
    lines.append("figures:")
    lines.extend(f"  {path.resolve()}" for path in result.figures)
    return lines


def analysis_summary(result: AnalysisResult) -> list[str]:
    """A short report of a run: what was explained, the headline comparisons, the checks, the files."""
    if not result.merged:
        return [
            f"explained {len(result.computed)} examples of this shard ({len(result.resumed)} were already done); "
            f"the final files are written by the run that finds every example in {result.output_dir / PROGRESS_DIR}"
        ]
    m = result.metrics
    faithfulness = m["faithfulness"]
    k = m["settings"].get("k_shot")
    lines = [
        f"explained {m['n_examples']} tweets ({len(result.computed)} computed now, {len(result.resumed)} resumed)",
        f"additivity: largest |base + sum(SHAP) - f(x)| = {m['additivity']['max_abs_error']:.2e}",
    ]
    for model in result.models:
        stats = m[model]
        top = ", ".join(row["token"] for row in stats["top_tokens"][:5])
        comp = faithfulness[model]["comprehensiveness"]["mean_aopc"]
        comp_random = faithfulness[model]["comprehensiveness_random"]["mean_aopc"]
        lines.append(
            f"{display_name(model, k):>20}: mean |SHAP| {stats['mean_abs_importance']:.4f}, "
            f"Gini {stats['mean_gini']:.3f}, comprehensiveness AOPC {comp:.3f} (random {comp_random:.3f}); "
            f"top tokens: {top}"
        )
    for comparison in (m.get("comparisons") or {}).values():
        a, b = comparison["models"]
        cosine = comparison["cosine_similarity"]
        if cosine["mean"] is not None:
            lines.append(
                f"{display_name(a, k)} vs {display_name(b, k)}: cosine {cosine['mean']:.3f} "
                f"[{cosine['ci_low']:.3f}, {cosine['ci_high']:.3f}]"
            )
    for pair, verdicts in (m.get("explainer_verdicts") or {}).items():
        lines.append(f"{pair} under each explainer: {verdicts['conclusion']}")
    lines.extend(f"note: {note}" for note in result.notes)
    lines.extend(f"removed {path} from an earlier run with other models" for path in result.removed_stale)
    lines.append(f"results in {result.output_dir}")
    lines.extend(f"  {path.name}" for path in result.files)
    return lines
