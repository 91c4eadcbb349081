"""The README's settings tables list every setting, in the table of its role, and nothing else.

The truth is the code: each role class in service/settings.py (`ROLES`) and the variables it declares
itself (env names, aliases included) must be exactly the rows of that role's table, in both
directions. The tests' and benchmarks' own variables (read with os.environ in tests/ and loadtests/)
must be exactly the rows of their table."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import ROLES, env_names, own_fields

ROOT = Path(__file__).resolve().parents[1]
ENV_READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']((?:SR3D|REDIS|CUDA)_[A-Z0-9_]+)["']""")
NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")

# README heading of each role's table.
TABLES = {
    "common": "### Every server process",
    "store": "### Gateway and worker: the job store",
    "gateway": "### Gateway",
    "worker": "### Worker",
    "engine": "### Engine (the language model)",
    "vllm": "## vLLM engine",
    "geometry": "### Geometry (point maps)",
    "client": "### Command-line clients",
}
TESTS_TABLE = "### Tests and benchmarks"


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From `heading` to the next heading of its level or above."""
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    stops = [m.start() for m in re.finditer(r"\n(#{2,%d}) " % len(level), text) if m.start() > start]
    return text[start:stops[0] if stops else None]


def first_column_names(markdown: str) -> list[str]:
    """The backticked names in the first column of every table row (header and rule rows skipped)."""
    names = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            names += NAME.findall(line.split("|")[1])
    return names


def declared(role: str) -> set[str]:
    cls = ROLES[role]
    return {name for field in own_fields(cls) if field != "vllm" for name in env_names(cls, field)}


@pytest.mark.parametrize("role", sorted(TABLES))
def test_each_role_table_lists_exactly_the_variables_of_its_role(role: str) -> None:
    documented = first_column_names(section(readme(), TABLES[role]))
    assert documented, f"no table under {TABLES[role]!r}"
    assert len(documented) == len(set(documented)), f"listed twice: {sorted({n for n in documented if documented.count(n) > 1})}"
    expected = declared(role)
    missing = sorted(expected - set(documented))
    unknown = sorted(set(documented) - expected)
    owners = {name: [r for r in ROLES if name in declared(r)] for name in unknown}
    assert not missing, f"{role} settings the README's {TABLES[role]!r} table does not list: {missing}"
    assert not unknown, f"rows under {TABLES[role]!r} that are no {role} setting (role that declares each: {owners})"


def test_every_role_has_a_table_and_every_setting_a_role() -> None:
    from service.settings import Settings, VLLMSettings

    assert set(TABLES) == set(ROLES)
    in_roles = {field for role in ROLES.values() for field in own_fields(role)}
    assert set(Settings.model_fields) <= in_roles  # nothing declared on Settings itself
    assert set(VLLMSettings.model_fields) <= in_roles


def env_reads_in(*folders: str) -> set[str]:
    found = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(ENV_READ.findall(path.read_text(encoding="utf-8")))
    return found


def test_the_tests_and_benchmarks_table_lists_their_own_variables() -> None:
    documented = set(first_column_names(section(readme(), TESTS_TABLE)))
    settings = {name for role in ROLES for name in declared(role)}
    own = env_reads_in("tests", "loadtests") - settings  # a test may read a setting too (SR3D_DATA_DIR)
    assert "SR3D_LONG_TESTS" in own  # the pattern still sees the tests' reads
    assert documented == own, f"not listed: {sorted(own - documented)}; listed but read nowhere: {sorted(documented - own)}"
