"""The package's shape, as "How it is built" (docs/layout.md) describes it: a core that stands on its own, and functions
short enough to read."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_utils"
CORE = PACKAGE / "core"
# What the core may import besides itself: the standard library and the libraries it is written on.
CORE_DEPENDENCIES = {"torch", "transformers", "bitsandbytes", "accelerate", "numpy", "pandas"}
LONGEST_FUNCTION = 60


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import statement in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_nothing_from_the_lab(path):
    for line, module, level in _imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        assert level <= 1, f"{where} imports from outside peft_utils.core (level {level}: {module})"
        if level == 0:
            top = module.split(".")[0]
            assert top != "peft_utils", f"{where} imports {module}: the core must not import the lab"
            assert top in CORE_DEPENDENCIES or top in sys.stdlib_module_names, f"{where} imports {module}"


def test_the_import_check_can_fail(tmp_path):
    """The check above reads real imports: a lab import, relative or absolute, is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from ..store import RunStore\nimport peft_utils.config\n", encoding="utf-8")
    assert sorted((module, level) for _, module, level in _imports(sample)) == [("peft_utils.config", 0), ("store", 2)]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{name} (line {line}: {length} lines)" for name, line, length in _functions(path)
            if length > LONGEST_FUNCTION]
    assert not long, f"{path.relative_to(PACKAGE.parent)}: {', '.join(long)}"


def test_the_core_reads_in_the_order_it_gives():
    """``core/__init__.py`` lists its files in reading order; each may import only the files listed before it."""
    listed = re.findall(r"^\d\. ``(\w+)\.py``", ast.get_docstring(ast.parse((CORE / "__init__.py").read_text())),
                        flags=re.MULTILINE)
    assert sorted(f"{name}.py" for name in listed) == sorted(p.name for p in CORE.glob("*.py") if p.stem != "__init__")
    for position, name in enumerate(listed):
        later = {module for _, module, level in _imports(CORE / f"{name}.py") if level == 1} & set(listed[position:])
        assert not later, f"core/{name}.py (file {position + 1}) imports {sorted(later)}, listed at or after it"


def test_the_settings_and_the_figures_import_no_torch():
    """``core.settings`` (the one adapter-settings shape) and what reads records (config, report, plots) load
    without torch: drawing figures from a results folder must not pay for it."""
    import subprocess

    program = ("import sys, peft_utils.core.settings, peft_utils.config, peft_utils.report, peft_utils.plots; "
               "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert run.stdout.strip() == "[]", run.stdout
