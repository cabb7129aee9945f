"""The layers point one way: scripts -> analysis -> lightning_modules / datamodules -> foundation (the shared leaf).

Every module's imports are read with `ast` (also those inside functions), so a rule broken anywhere fails here;
the checker itself is shown to catch a violation. Packaging puts no generic top-level package (`scripts`, `tests`,
`bench`) into site-packages.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("foundation", "datamodules", "lightning_modules", "analysis", "bench")
PROJECT = (*LIBRARY, "scripts", "tests")
# Modules that load, wrap or score a model: the data layer never imports them.
MODEL_MODULES = ("lightning_modules",)
HEAVY_AT_IMPORT = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "transformers", "peft")


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top_level.add(id(inner))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def layer_violations(root: Path) -> list[str]:
    """Every import under `root` that runs against the layers, as `file: imports module (rule)`."""
    bad = []
    for package in LIBRARY:
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root)
            for module, top_level in imports_of(path):
                head = module.split(".")[0]
                if head == "scripts":
                    bad.append(f"{where}: imports {module} (the library never imports its entry points)")
                if package == "datamodules" and head in (*MODEL_MODULES, "analysis"):
                    bad.append(f"{where}: imports {module} (the data layer loads, scores and analyses no model)")
                if package == "lightning_modules" and head in ("analysis", "datamodules"):
                    bad.append(f"{where}: imports {module} (the model layer knows no data or analysis)")
                if package == "foundation" and head in PROJECT and head != "foundation":
                    bad.append(f"{where}: imports {module} (the shared leaf imports nothing else of the project)")
                if package == "foundation" and top_level and head in HEAVY_AT_IMPORT:
                    bad.append(f"{where}: imports {module} at import time (the shared leaf stays light)")
    return bad


def test_every_module_follows_the_layer_rules():
    assert layer_violations(ROOT) == []


def test_the_checker_catches_each_broken_rule(tmp_path):
    for package in LIBRARY:
        (tmp_path / package).mkdir()
    (tmp_path / "analysis" / "run.py").write_text("from scripts.evaluate import main\n")
    (tmp_path / "datamodules" / "data.py").write_text(
        "def f():\n    from lightning_modules.scoring import LabelScorer\n"
    )
    (tmp_path / "lightning_modules" / "model.py").write_text("import analysis.models\n")
    (tmp_path / "foundation" / "leaf.py").write_text("import torch\nfrom datamodules import prompts\n")
    (tmp_path / "foundation" / "lazy.py").write_text("def f():\n    import torch\n")  # lazy: allowed
    found = layer_violations(tmp_path)
    assert len(found) == 5, found
    for expected in ("entry points", "data layer", "model layer", "nothing else of the project", "import time"):
        assert any(expected in line for line in found), expected


def test_the_shared_leaf_loads_no_model_stack():
    """Importing every leaf module leaves torch, lightning and transformers unloaded (a fresh interpreter)."""
    modules = sorted(f"foundation.{p.stem}" for p in (ROOT / "foundation").glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += f"print(sorted(m for m in {HEAVY_AT_IMPORT!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert len(modules) >= 6  # errors, packaged files, embedded model, hub, atomic files, output names and folders


def test_the_wheel_holds_the_library_packages_only(tmp_path):
    """`pip install .` installs the library; the scripts run by path, and no generic top-level name is taken."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PROJECT:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"foundation", "datamodules", "lightning_modules", "analysis"}
    assert "analysis/explanation/run.py" in names and "foundation/output_names.py" in names  # subpackages too
