"""``albatross.core`` does no I/O and reads no clock or randomness: its imports prove it."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import albatross.core

FORBIDDEN = {
    "asyncio",
    "socket",
    "subprocess",
    "time",
    "random",
    "os",
    "threading",
    "select",
    "selectors",
    "urllib",
    "http",
}


def _source(name: str) -> Path:
    # find_spec locates the file without executing the module itself.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin)


MODULES = sorted(
    (m.name, m.ispkg) for m in pkgutil.walk_packages(albatross.core.__path__, "albatross.core.")
)


def imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``tree`` imports (relative imports resolved)."""
    names: set[str] = set()
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            names.add(mod)
            # `from albatross import runtime` imports albatross.runtime.
            names.update(f"{mod}.{a.name}" for a in node.names if mod == "albatross")
    return names


def violations(names: set[str]) -> list[str]:
    bad = []
    for n in sorted(names):
        top = n.split(".", 1)[0]
        outside_core = (
            top == "albatross"
            and n != "albatross"
            and not (n == "albatross.core" or n.startswith("albatross.core."))
        )
        if top in FORBIDDEN or outside_core:
            bad.append(n)
    return bad


def test_core_has_modules() -> None:
    names = {name for name, _ in MODULES}
    assert {"albatross.core.journal", "albatross.core.stops", "albatross.core.replicas"} <= names


@pytest.mark.parametrize(("name", "is_package"), MODULES, ids=[name for name, _ in MODULES])
def test_core_module_imports_nothing_impure(name: str, is_package: bool) -> None:
    path = _source(name)
    tree = ast.parse(path.read_text(), str(path))
    assert violations(imported(tree, name, is_package)) == []


def test_package_init_is_pure() -> None:
    path = Path(albatross.core.__file__)
    tree = ast.parse(path.read_text(), str(path))
    assert violations(imported(tree, "albatross.core", True)) == []


@pytest.mark.parametrize(
    "src",
    [
        "import asyncio",
        "import os.path",
        "from time import monotonic",
        "from http import HTTPStatus",
        "import urllib.request",
        "from albatross.runtime import pool",
        "from albatross import gateway",
        "from ..gateway import sse",
        "import random as r",
    ],
)
def test_the_checker_catches_impure_imports(src: str) -> None:
    tree = ast.parse(src)
    assert violations(imported(tree, "albatross.core.x", False)) != []


@pytest.mark.parametrize(
    "src",
    [
        "from albatross.core.errors import ClientError",
        "from .journal import derive_seed",
        "import dataclasses",
        "from typing import Any",
        "from enum import StrEnum",
        "import pydantic",
    ],
)
def test_the_checker_accepts_pure_imports(src: str) -> None:
    tree = ast.parse(src)
    assert violations(imported(tree, "albatross.core.x", False)) == []
