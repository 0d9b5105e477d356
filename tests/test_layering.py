"""The code's units depend one way only, lowest first (the project's layering requirement).

Every import in every .py file of the units is read with `ast` -- module level, inside
functions, under `if TYPE_CHECKING:`, relative ones, and `importlib.import_module("...")` with a
literal name -- and each broken rule is reported as "file:line imports X (why)".
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The order of the units, lowest first. A unit may import itself and any unit on a lower row,
# never one on a higher row nor another unit of its own row.
LAYERS: list[tuple[str, ...]] = [
    # close matches for a misspelt name (difflib only): the `flwr run` driver checks keys with
    # it before importing torch, and the config names unknown keys with the same words
    ("gaisnet_flwr.names",),
    ("gaisnet_flwr.vit",),  # the prompted ViT
    ("gaisnet_flwr.split",),  # split plans, the D2D chain, FLOPs, links
    (
        "gaisnet_flwr.costs",  # latency / energy pricing
        "gaisnet_flwr.data",  # image data and partitions
        "gaisnet_flwr.deploy",  # the peer process, PKI, remote segments
        "gaisnet_flwr.service",  # fine-tune-or-serve scheduling, clustering
    ),
    # a device population and its clusters: combines costs (devices, links, pricing, memory)
    # and service (clustering), so it sits above both and below the config that reads it
    ("gaisnet_flwr.population",),
    ("gaisnet_flwr.config",),  # RunConfig, read once at the app boundary
    ("gaisnet_flwr.training",),  # local loops
    ("gaisnet_flwr.cloud",),  # the cloud's foundation model
    ("strategies", "clients"),  # Flower strategies; the cluster client
    ("gaisnet_flwr.apps",),  # ServerApp, ClientApp
    ("gaisnet_flwr.experiments",),  # the paper's experiments and tools
    ("scripts",),  # thin command lines
]
# The bare package `gaisnet_flwr` (its __init__) sits below every unit and imports none.
PACKAGE = "gaisnet_flwr"
LEVEL = {unit: level for level, row in enumerate(LAYERS) for unit in row}

# Units that must stay free of Flower (the top-level packages they may not import).
NO_FLOWER = {
    "gaisnet_flwr.vit": {"flwr", "flwr_datasets"},
    "gaisnet_flwr.split": {"flwr", "flwr_datasets"},
    "gaisnet_flwr.costs": {"flwr", "flwr_datasets"},
    "gaisnet_flwr.data": {"flwr"},  # Flower Datasets' partitioners are allowed
    "gaisnet_flwr.population": {"flwr", "flwr_datasets"},
}
SCRIPTS_MAY_IMPORT = "gaisnet_flwr.experiments"
FIRST_PARTY = {"gaisnet_flwr", "strategies", "clients", "scripts", "tests"}
SOURCE_DIRS = ["gaisnet_flwr", "strategies", "clients", "scripts"]
NO_SYS_PATH_DIRS = [*SOURCE_DIRS, "tests"]


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the repository
    line: int
    module: str  # the absolute dotted name imported

    def where(self) -> str:
        return f"{self.path}:{self.line} imports {self.module}"


def python_files(dirs: list[str]) -> list[Path]:
    return sorted(p.relative_to(REPO) for d in dirs for p in (REPO / d).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    """The unit a dotted name belongs to: the longest unit that is it or a prefix of it."""
    if module == PACKAGE:
        return PACKAGE
    units = [u for u in LEVEL if module == u or module.startswith(u + ".")]
    return max(units, key=len) if units else None


def imports_of(path: Path, source: str | None = None) -> Iterator[Import]:
    """Every import in the file, wherever it stands, with relative names made absolute."""
    text = (REPO / path).read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                full = f"{base}.{alias.name}"
                deeper = base.split(".")[0] in FIRST_PARTY and unit_of(full) != unit_of(base)
                yield Import(path, node.lineno, full if deeper else base)
        elif (
            isinstance(node, ast.Call)
            and "import_module"
            in (getattr(node.func, "attr", None), getattr(node.func, "id", None))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(path, node.lineno, node.args[0].value)


def all_imports() -> Iterator[tuple[str, Import]]:
    """(unit of the importing file, import) over the units' files."""
    for path in python_files(SOURCE_DIRS):
        unit = unit_of(module_name(path))
        assert unit is not None, f"{path} is in no unit of LAYERS"
        for imp in sorted(imports_of(path), key=lambda imp: imp.line):
            yield unit, imp


def fail_with(violations: list[str]) -> None:
    if violations:
        unique = list(dict.fromkeys(violations))  # `from m import a, b` is one import of m
        pytest.fail(f"{len(unique)} violation(s):\n" + "\n".join(unique), pytrace=False)


SAMPLE = """\
from __future__ import annotations
import importlib
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from flwr.app import Message
from . import plan
from ..vit.model import PromptedViT
from gaisnet_flwr import config
def late():
    import strategies.cloud_edge
    return importlib.import_module("gaisnet_flwr.apps.serving")
"""


def test_the_checks_see_every_kind_of_import() -> None:
    # The rules below are only as good as what they see: a made-up file in gaisnet_flwr.split.
    path = Path("gaisnet_flwr/split/sample.py")
    found = sorted((imp.line, imp.module, unit_of(imp.module)) for imp in imports_of(path, SAMPLE))
    assert found == [
        (1, "__future__", None),
        (2, "importlib", None),
        (3, "typing", None),
        (5, "flwr.app", None),
        (6, "gaisnet_flwr.split", "gaisnet_flwr.split"),  # its own unit: where in it is moot
        (7, "gaisnet_flwr.vit.model", "gaisnet_flwr.vit"),
        (8, "gaisnet_flwr.config", "gaisnet_flwr.config"),
        (10, "strategies.cloud_edge", "strategies"),
        (11, "gaisnet_flwr.apps.serving", "gaisnet_flwr.apps"),
    ]
    assert unit_of(module_name(path)) == "gaisnet_flwr.split"
    tampering = "import sys\nsys.path.insert(0, 'x')\nfrom sys import path\nsys.path += ['y']\n"
    assert sorted(sys_path_uses(path, tampering)) == [2, 3, 4]


def test_every_file_belongs_to_a_unit() -> None:
    loose = [str(p) for p in python_files(SOURCE_DIRS) if unit_of(module_name(p)) is None]
    fail_with([f"{p} is in no unit; add its package to LAYERS" for p in loose])


def test_units_import_only_themselves_and_lower_units() -> None:
    violations = []
    for unit, imp in all_imports():
        if imp.module.split(".")[0] not in FIRST_PARTY:
            continue
        target = unit_of(imp.module)
        if target is None:
            violations.append(f"{imp.where()} (unit {unit} may not import {imp.module}: no unit)")
        elif target not in (unit, PACKAGE) and (unit == PACKAGE or LEVEL[target] >= LEVEL[unit]):
            violations.append(f"{imp.where()} (unit {unit} may not import unit {target})")
    fail_with(violations)


def test_core_units_import_no_flower() -> None:
    violations = [
        f"{imp.where()} (unit {unit} may not import {imp.module.split('.')[0]})"
        for unit, imp in all_imports()
        if imp.module.split(".")[0] in NO_FLOWER.get(unit, set())
    ]
    fail_with(violations)


def test_scripts_import_only_the_experiments() -> None:
    violations = []
    for unit, imp in all_imports():
        if unit != "scripts":
            continue
        top = imp.module.split(".")[0]
        allowed = unit_of(imp.module) == SCRIPTS_MAY_IMPORT or (
            top not in FIRST_PARTY and (top in sys.stdlib_module_names or top == "__future__")
        )
        if not allowed:
            violations.append(
                f"{imp.where()} (unit scripts may import only {SCRIPTS_MAY_IMPORT} and stdlib)"
            )
    fail_with(violations)


def sys_path_uses(path: Path, source: str | None = None) -> Iterator[int]:
    """Lines that touch the import path: `sys.path` in any form, `from sys import path`."""
    text = (REPO / path).read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            yield node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            yield from (node.lineno for alias in node.names if alias.name == "path")


def test_no_sys_path_manipulation() -> None:
    violations = [
        f"{path}:{line} uses sys.path (imports go through the installed packages)"
        for path in python_files(NO_SYS_PATH_DIRS)
        for line in sorted(sys_path_uses(path))
    ]
    fail_with(violations)


def test_no_test_module_imports_another() -> None:
    # Shared fixtures and helpers live in tests/conftest.py, the one module tests may import.
    violations = [
        f"{imp.where()} (a test module may import only tests.conftest from tests)"
        for path in python_files(["tests"])
        for imp in sorted(imports_of(path), key=lambda imp: imp.line)
        if imp.module.split(".")[0] == "tests" and imp.module != "tests.conftest"
    ]
    fail_with(violations)
