"""Every bad input, through the real entry points: exit code 2, one `error:` line, no traceback, nothing written.

Each case runs a command's `main()` in this process (the scripts are one line around it), on real files: a tiny
model and synthetic tweets, the embedded SmolLM2 for its tokenizer, configs and data files that are broken the way
users break them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny import save_tiny_llama, synthetic_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # experiment | train | evaluate | analyze | roar
    arguments: tuple[str, ...]  # with {out}, {data}, {model}, {files}, {config}, {adapter}, {ckpt} placeholders
    message: str  # a fragment of the one error line


# Data as users break it; every folder has train.csv and test.csv unless its name says otherwise.
def write_broken_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.csv").write_bytes(b"")
    (folder / "header_only.csv").write_text("text,label\n")
    (folder / "open_quote.csv").write_text('text,label\n"i love it,positive\nawful,negative\n')
    (folder / "latin1.csv").write_bytes("text,label\ncaf\xe9 so great,positive\nawful,negative\n".encode("latin-1"))
    rows = synthetic_rows(30, seed=3)
    blank = folder / "blank_label"
    blank.mkdir()
    write_csv(blank / "train.csv", rows[:-1] + [(rows[-1][0], "")])
    write_csv(blank / "test.csv", rows[:6])
    one_class = folder / "one_class"
    one_class.mkdir()
    write_csv(one_class / "train.csv", [(text, "positive") for text, _ in rows])
    write_csv(one_class / "test.csv", [(text, "positive") for text, _ in rows[:6]])
    no_test = folder / "no_test"
    no_test.mkdir()
    write_csv(no_test / "train.csv", rows)
    no_neutral_in_train = folder / "no_neutral_in_train"
    no_neutral_in_train.mkdir()
    write_csv(no_neutral_in_train / "train.csv", [row for row in rows if row[1] != "neutral"])
    write_csv(no_neutral_in_train / "test.csv", rows[:6])
    (folder / "not_yaml.yaml").write_text("trainer: [max_epochs: 1\n")
    (folder / "a_list.yaml").write_text("- trainer\n- model\n")
    (folder / "corrupt.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    (folder / "a_file").write_text("not a folder\n")


E = "experiment"
TINY = ("--model-name", "{model}", "--dataset-name", "{data}", "--no-load-in-4bit", "--output-dir", "{out}")
FT = (*TINY, "--finetune")
ROAR = ("--config", "{config}", "--output-dir", "{out}")
CASES = [
    # the one command: what the data must be
    Case("unknown embedded model", E, (*FT, "--model-name", "embedded:nope"), "Unknown embedded model"),
    Case("unknown embedded dataset", E, (*FT, "--dataset-name", "embedded:nope"), "Unknown embedded dataset"),
    Case("missing eval split", E, (*FT, "--dataset-name", "{files}/no_test"), "has no split 'test'"),
    Case("missing text column", E, (*FT, "--text-field", "tweet"), "has no column 'tweet'"),
    Case("missing label column", E, (*FT, "--label-field", "sentiment"), "has no column 'sentiment'"),
    Case("label space absent", E, (*FT, "--label-space", "joy", "anger"), "are not labels"),
    Case("label space of one class", E, (*FT, "--label-space", "positive"), "one class only"),
    Case("label space names a class twice", E, (*FT, "--label-space", "positive", "positive"), "twice"),
    Case("empty csv", E, (*FT, "--dataset-name", "{files}/empty.csv"), "is empty"),
    Case("header only", E, (*FT, "--dataset-name", "{files}/header_only.csv"), "has no rows"),
    Case("unterminated quote", E, (*FT, "--dataset-name", "{files}/open_quote.csv"), "quotes are balanced"),
    Case("not utf-8", E, (*FT, "--dataset-name", "{files}/latin1.csv"), "not UTF-8"),
    Case("blank label", E, (*FT, "--dataset-name", "{files}/blank_label"), "have no label in column 'label'"),
    Case("one class only", E, (*FT, "--dataset-name", "{files}/one_class"), "one class only"),
    Case(
        "k-shot demonstrations the train split lacks",
        E,
        (*FT, "--dataset-name", "{files}/no_neutral_in_train"),
        "k-shot baseline cannot be built",
    ),
    # the one command: options
    Case("zero seeds", E, (*FT, "--seeds", "0"), "--seeds must be at least 1"),
    Case("seeds without fine-tuning", E, (*TINY, "--seeds", "2"), "add --finetune"),
    Case("seeds not a number", E, (*FT, "--seeds", "two"), 'Parser key "seeds"'),
    Case("budget of one evaluation", E, (*FT, "--shap-max-evals", "1"), "--shap-max-evals 1 is too small"),
    Case("no tweets to explain", E, (*FT, "--shap-example-count", "0"), "example"),
    Case("no training tweets", E, (*FT, "--train-subset", "0"), "--train-subset must be a positive number"),
    Case("unknown baseline", E, (*FT, "--baselines", "few_shot"), "Unknown baseline 'few_shot'"),
    Case("unknown explainer", E, (*FT, "--explainers", "partition", "lime2"), "Unknown explainer 'lime2'"),
    Case("explainers without partition", E, (*FT, "--explainers", "occlusion"), "must include partition"),
    Case("unknown features", E, (*FT, "--features", "sentences"), "sentences"),
    Case("unknown comparison target", E, (*FT, "--comparison-target", "majority"), "majority"),
    Case("output path is a file", E, (*FT, "--output-dir", "{files}/a_file"), "is a file, not a folder"),
    # scripts/train.py
    Case("config is not yaml", "train", ("fit", "--config", "{files}/not_yaml.yaml"), "is not valid YAML"),
    Case("config is not a mapping", "train", ("fit", "--config", "{files}/a_list.yaml"), "holds a list"),
    Case("config does not exist", "train", ("fit", "--config", "{files}/nope.yaml"), "does not exist"),
    Case(
        "multi-token label word",
        "train",
        ("fit", "--config", "configs/embedded.yaml", "--trainer.default_root_dir", "{out}")
        + ("--data.label_words", '[" 0", " 1", " 2"]'),
        "label word ' 0' is 2 tokens",
    ),
    Case("unknown option", "train", ("fit", "--config", "{config}", "--model.lora_rank", "8"), "lora_rank"),
    Case("unknown dtype", "train", ("fit", "--config", "{config}", "--model.dtype", "fp8"), "Unknown --model.dtype"),
    Case("fp16 fit on a CPU", "train", ("fit", "--config", "{config}", "--model.dtype", "float16"), "only on a GPU"),
    Case(
        "corrupt checkpoint", "train", ("fit", "--config", "{config}", "--ckpt_path", "{files}/corrupt.ckpt"), "corrupt"
    ),
    Case(
        "checkpoint from another label set",
        "train",
        ("fit", "--config", "{config}", "--ckpt_path", "{ckpt}", "--data.label_space", "[negative, positive]"),
        "was trained on labels ['negative', 'neutral', 'positive']",
    ),
    Case(
        "checkpoint from another base model",
        "train",
        ("fit", "--config", "{config}", "--ckpt_path", "{ckpt}", "--model.model_name", "{other_model}"),
        "but the configuration names",
    ),
    # scripts/evaluate.py and scripts/analyze.py
    Case(
        "adapter does not exist",
        "evaluate",
        ("--config", "{config}", "--output-dir", "{out}", "--adapter", "{files}/nope"),
        "does not exist",
    ),
    Case(
        "adapter of another base model",
        "evaluate",
        (
            "--config",
            "{config}",
            "--output-dir",
            "{out}",
            "--adapter",
            "{adapter}",
            "--model.model_name",
            "{other_model}",
        ),
        "was trained on",
    ),
    Case(
        "corrupt adapter",
        "evaluate",
        ("--config", "{config}", "--output-dir", "{out}", "--adapter", "{corrupt_adapter}"),
        "is corrupt",
    ),
    Case(
        "checkpoint as adapter, other labels",
        "evaluate",
        (
            "--config",
            "{config}",
            "--output-dir",
            "{out}",
            "--adapter",
            "{ckpt}",
            "--data.label_space",
            "[negative, positive]",
        ),
        "was trained on labels",
    ),
    Case(
        "unknown target", "analyze", ("--config", "{config}", "--output-dir", "{out}", "--target", "loudest"), "loudest"
    ),
    Case(
        "shard outside the shards",
        "analyze",
        ("--config", "{config}", "--output-dir", "{out}", "--num-shards", "2", "--shard-index", "2"),
        "shard",
    ),
    # scripts/roar.py
    Case("roar: random is the control", "roar", (*ROAR, "--explainer", "random"), "--explainer random is the control"),
    Case("roar: unknown explainer", "roar", (*ROAR, "--explainer", "shapley"), "Unknown explainer 'shapley'"),
    Case("roar: share of all words", "roar", (*ROAR, "--fractions", "0.5", "1.0"), "strictly between 0 and 1"),
    Case("roar: one share twice", "roar", (*ROAR, "--fractions", "0.3", "0.30"), "names one percentage twice"),
    Case("roar: token features", "roar", (*ROAR, "--features", "tokens"), "ROAR removes words"),
    Case("roar: no output folder", "roar", ("--config", "{config}"), "pass --output-dir"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, trained) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    files = root / "files"
    write_broken_files(files)
    corrupt_adapter = root / "corrupt_adapter"
    shutil.copytree(trained["adapter"], corrupt_adapter)
    weights = corrupt_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated mid-copy
    return {
        "files": str(files),
        "data": str(trained["data"]),
        "model": trained["model"],
        "other_model": str(save_tiny_llama(root / "other-tiny-llama", seed=1)),
        "config": str(trained["config"]),
        "adapter": str(trained["adapter"]),
        "ckpt": str(trained["checkpoint"]),
        "corrupt_adapter": str(corrupt_adapter),
    }


def entry_point(command: str):
    from analysis.commands import analyze_main, evaluate_main, experiment_main, roar_main
    from analysis.configuration import run_cli

    return {
        "experiment": experiment_main,
        "train": run_cli,
        "evaluate": evaluate_main,
        "analyze": analyze_main,
        "roar": roar_main,
    }[command]


def folder_state(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_table_holds_at_least_thirty_distinct_cases():
    assert len(CASES) >= 30 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(case, places, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    values = {**places, "out": str(out)}
    arguments = [argument.format(**values) for argument in case.arguments]
    watched = [out, Path(places["files"]) / "a_file", Path(places["config"]).parent / "train"]
    before = [folder_state(path) for path in watched]
    code = entry_point(case.command)(arguments)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert case.message in errors[0], errors[0]
    assert [folder_state(path) for path in watched] == before  # absent, or as it was


def test_an_earlier_run_with_other_options_is_refused_and_left_as_it_was(places, tmp_path, capsys):
    from analysis.commands import experiment_main

    out = tmp_path / "run"
    flags = ["--model-name", places["model"], "--dataset-name", places["data"], "--no-load-in-4bit"]
    flags += ["--no-run-shap", "--baselines", "zero_shot", "--no-project-badge", "--output-dir", str(out)]
    assert experiment_main(flags) == 0
    before = folder_state(out)
    capsys.readouterr()
    assert experiment_main([*flags, "--k-shot", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--k-shot 4 there, 2 here" in errors[0]
    assert folder_state(out) == before
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
