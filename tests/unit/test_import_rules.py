"""The import table as data (``MAY`` / ``NEVER`` in tools/architecture.py): no stage imports against the data
flow, no import circle, and docs/architecture.md shows the arrows the code has."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _architecture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools" / "architecture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("architecture", module)
    spec.loader.exec_module(module)
    return module


arch = _architecture()


def test_no_import_runs_against_the_data_flow() -> None:
    assert arch.violations(arch.imports(ROOT)) == []


def test_every_package_has_a_rule_and_says_what_it_owns() -> None:
    for pkg in sorted(arch.packages(ROOT)):
        assert pkg in arch.MAY, f"{pkg}/ is a new package: add it to MAY in tools/architecture.py"
        doc = (ROOT / pkg / "__init__.py").read_text()
        assert '"""' in doc and "placeholder" not in doc.lower(), f"{pkg}/__init__.py must say what {pkg} owns"


def test_no_import_circle_between_packages_or_modules() -> None:
    found = arch.imports(ROOT)
    assert arch.cycles(arch.package_edges(found)) == []
    assert arch.module_cycles(found, ROOT) == []


def test_the_architecture_diagram_is_current() -> None:
    doc = ROOT / arch.DOC
    assert arch.render(doc.read_text(), arch.package_edges(arch.imports(ROOT))) == doc.read_text(), (
        "docs/architecture.md is stale: run python3 tools/architecture.py")


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_forbidden_import_is_found_even_inside_a_function(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "producers/__init__.py": '"""robots"""\n',
        "producers/actor.py": "def f():\n    from sim.tasks import ONLINE_SEEDS\n",
        "sim/__init__.py": '"""world"""\n',
        "sim/tasks.py": "ONLINE_SEEDS = range(3)\n",
        "learner/__init__.py": '"""learner"""\n',
        "learner/evaluation.py": "import producers.actor\nfrom consumers import assembly\n",
        "consumers/__init__.py": '"""processor"""\n',
        "consumers/assembly.py": "from rewards import recap\n",
        "rewards/__init__.py": '"""maths"""\n',
        "rewards/recap.py": "X = 1\n",
    })
    lines = arch.violations(arch.imports(root))
    assert any(line.startswith("producers/actor.py:2: producers -> sim.tasks") for line in lines), lines
    assert any("learner -> producers.actor (the learner drives no robot)" in line for line in lines), lines
    assert any("learner -> consumers.assembly (the learner reads tables" in line for line in lines), lines
    assert not any("consumers/assembly.py" in line for line in lines)  # the shared maths is allowed


def test_an_unlisted_arrow_is_refused_too(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"producers/__init__.py": "", "producers/x.py": "import lakehouse\n",
                            "lakehouse/__init__.py": ""})
    assert arch.violations(arch.imports(root)) == [
        "producers/x.py:1: producers -> lakehouse (producers may import only ['infra', 'schemas'])"]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_module_circle_is_found(tmp_path: Path, lazy: bool) -> None:
    back = "def f():\n    from lakehouse.tables import spec\n" if lazy else "from lakehouse.tables import spec\n"
    root = _tree(tmp_path, {"lakehouse/__init__.py": "from lakehouse.tables import spec\n",
                            "lakehouse/tables.py": "from lakehouse.writer import W\nspec = 1\n",
                            "lakehouse/writer.py": back + "W = 2\n"})
    assert arch.module_cycles(arch.imports(root), root) == [["lakehouse.tables", "lakehouse.writer"]]
