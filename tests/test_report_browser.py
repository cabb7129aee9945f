"""report.html in a real browser: headless Debian chromium renders it without console errors and shows the numbers.

Chromium logs every console message (errors, CSP violations, uncaught exceptions) as a `:CONSOLE` line on stderr
with `--enable-logging=stderr`; the report has no scripts, so any such line is a failure. The first test proves
that this detection works on a page that does produce console errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from analysis.commands import experiment_main as main
from analysis.report.page import format_number, format_p
from tests.tiny import synthetic_rows, write_csv

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); CI installs it"
)
HOSTILE_TWEET = '<script>console.error("xss")</script> love <img src=x onerror=alert(1)> day'


def open_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after load (`--dump-dom`) and the console lines chromium logged while loading `page`."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


class VisibleText(HTMLParser):
    """Text a reader sees (outside <style>/<script>/<title>); block and cell boundaries become spaces."""

    INLINE = ("span", "b", "a", "i", "em", "strong")

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in ("style", "script", "title")
        if tag not in self.INLINE:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        self.hidden -= tag in ("style", "script", "title")
        if tag not in self.INLINE:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = VisibleText()
    parser.feed(dom)
    return " ".join(unescape("".join(parser.parts)).split())


def test_console_errors_are_detected(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("boom"); nope();</script></body></html>')
    dom, console = open_in_chromium(page, tmp_path / "profile")
    assert "<p>x</p>" in dom
    assert any("boom" in line for line in console) and any("nope is not defined" in line for line in console)


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A full run (fine-tuned, SHAP, badge) on the tiny model, whose first eval tweet is hostile HTML."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    data.mkdir()
    write_csv(data / "train.csv", synthetic_rows(24, seed=1))
    write_csv(data / "test.csv", [(HOSTILE_TWEET, "positive")] + synthetic_rows(11, seed=2))
    out = root / "run"
    argv = ["--model-name", tiny_model_dir, "--dataset-name", str(data), "--no-load-in-4bit", "--finetune"]
    argv += ["--shap-example-count", "2", "--shap-max-evals", "30", "--output-dir", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_report_renders_without_console_errors_and_shows_the_numbers(report_run, tmp_path):
    dom, console = open_in_chromium(report_run / "report.html", tmp_path / "profile")
    assert console == []  # no script ran (the hostile tweet is text), nothing was blocked or failed to load
    assert "<script" not in dom.split("<body", 1)[1]
    text = visible_text(dom)
    assert "QNTM-42A9" in text
    for model in ("zero_shot", "zero_shot_calibrated", "k_shot", "fine_tuned"):
        metrics = json.loads((report_run / f"{model}_metrics.json").read_text())
        assert metrics["source"]["display_name"] in text
        for key in ("accuracy", "macro_f1"):
            ci = metrics["confidence_intervals"][key]
            shown = f"{metrics[key]:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]"
            assert shown in text, shown
        for key in ("mcc", "ece", "label_space_mass", "format_compliance"):
            assert format_number(metrics[key]) in text
    comparison = json.loads((report_run / "comparison.json").read_text())
    for pair in comparison["comparisons"].values():
        difference = pair["differences"]["accuracy"]
        assert f"{difference['difference']:.4f} [{difference['ci_low']:.4f}, {difference['ci_high']:.4f}]" in text
        assert f"p = {format_p(pair['mcnemar']['p_value'])} (Holm-adjusted" in text
    interpretability = json.loads((report_run / "interpretability_metrics.json").read_text())
    for model in ("zero_shot", "fine_tuned"):
        assert f"{interpretability[model]['mean_abs_importance']:.4f}" in text
        assert f"{interpretability[model]['mean_gini']:.4f}" in text
    cosine = interpretability["comparison"]["cosine_similarity"]
    assert f"{cosine['mean']:.4f} [{cosine['ci_low']:.4f}, {cosine['ci_high']:.4f}]" in text
    manifest = json.loads((report_run / "run.json").read_text())
    assert manifest["data"]["eval"]["sha256"] in text


@pytest.mark.slow
def test_report_is_self_contained(report_run):
    page = (report_run / "report.html").read_text()
    assert 'http-equiv="Content-Security-Policy"' in page  # the browser itself refuses any network load
    for attribute in ("src", "href"):
        for value in page.split(f'{attribute}="')[1:]:
            assert not value.startswith(("http:", "https:", "//")), value[:80]
    assert page.count('src="data:image/png;base64,') >= 6  # every figure is embedded
    assert 'src="data:image/svg+xml;base64,' in page  # the badge
    assert 'href="zero_shot_metrics.json"' in page and 'href="lora_adapter/"' in page  # raw files linked
    # The heatmaps are embedded as srcdoc: the hostile tweet is escaped once for its page and once for the attribute.
    assert "srcdoc=" in page and "&amp;lt;" in page and "<script" not in page and "<img src=x" not in page
