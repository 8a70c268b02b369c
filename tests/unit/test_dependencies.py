"""What each package must install: ``iot-common`` keeps its backend libraries in extras, every package
declares the extras of the ``iot_common`` modules it imports, and the simulator gets none of them."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "libs/common"
PACKAGES = {
    "iot-api": ROOT / "services/api",
    "iot-ingest": ROOT / "services/ingest",
    "iot-realtime": ROOT / "services/realtime",
    "iot-sim": ROOT / "tools/sim",
}
BACKEND_LIBRARIES = {"asyncpg", "redis", "gmqtt", "aiohttp", "pyjwt", "prometheus-client", "tenacity"}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(text: str) -> tuple[str, set[str]]:
    """Name and extras of a PEP 508 requirement."""
    match = _REQUIREMENT.match(text)
    assert match is not None, text
    extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
    return canonical(match.group(1)), extras


def project(folder: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    return project


def common_provides(extras: set[str]) -> set[str]:
    """The distributions ``iot-common[extras]`` installs itself (its own extras followed)."""
    spec = project(COMMON)
    provided = {requirement(r)[0] for r in spec["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in spec["optional-dependencies"][extra]:
            name, nested = requirement(text)
            if name == "iot-common":
                todo.extend(nested)
            else:
                provided.add(name)
    return provided


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports, except under ``if TYPE_CHECKING:`` (absolute names, as written)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@cache
def distribution_of() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def third_party(modules: set[str]) -> set[str]:
    """The distributions providing the non-standard-library, non-platform ``modules``."""
    tops = {m.partition(".")[0] for m in modules}
    return {
        canonical(dist)
        for top in tops
        if top not in sys.stdlib_module_names and not top.startswith("iot_")
        for dist in distribution_of().get(top, [top])
    }


def common_modules() -> dict[str, Path]:
    src = COMMON / "src"
    modules = {}
    for path in (src / "iot_common").rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def common_needs(imported: set[str]) -> set[str]:
    """The distributions the ``iot_common`` modules among ``imported`` need, with all they import."""
    modules = common_modules()
    todo = [m for m in imported if m in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent in modules:  # importing iot_common.db.x runs iot_common/db/__init__.py first
            todo.append(parent)
        todo.extend(m for m in runtime_imports(modules[name]) if m in modules)
    return set().union(*(third_party(runtime_imports(modules[m])) for m in seen))


def package_imports(folder: Path) -> set[str]:
    return set().union(*(runtime_imports(p) for p in (folder / "src").rglob("*.py")))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_declares_the_extras_of_the_iot_common_modules_it_imports(package: str) -> None:
    folder = PACKAGES[package]
    requirements = dict(requirement(r) for r in project(folder)["dependencies"])
    from_common = common_provides(requirements["iot-common"])
    imported = package_imports(folder)
    assert common_needs(imported) - from_common == set()
    # What the package imports itself comes from its own requirements or from iot-common's.
    assert third_party(imported) - from_common - set(requirements) == set()


def test_the_core_of_iot_common_installs_no_backend_library() -> None:
    assert common_provides(set()) == {"msgspec", "structlog"}
    assert common_needs({"iot_common.messages", "iot_common.topics", "iot_common.settings"}) <= {
        "msgspec",
        "structlog",
    }


def test_the_simulator_locks_no_backend_library() -> None:
    """What ``uv sync --package iot-sim`` would install, read from uv.lock (extras and all)."""
    lock = {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    todo: list[tuple[str, frozenset[str]]] = [("iot-sim", frozenset())]
    installed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        installed.add(name)
        entry = lock[name]
        deps = list(entry.get("dependencies", []))
        for extra in extras:
            deps += entry.get("optional-dependencies", {}).get(extra, [])
        todo.extend((d["name"], frozenset(d.get("extra", []))) for d in deps)
    assert "iot-common" in installed
    assert installed & BACKEND_LIBRARIES == set()
