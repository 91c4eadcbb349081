"""The README's settings tables list every setting, and nothing else (issue 28: SR3D_PORT, SR3D_HOST,
SR3D_URL and a dozen more were missing). The truth is the code: the `Settings` and `VLLMSettings`
models (their env names, aliases included) and every environment variable read elsewhere
(`os.environ.get("SR3D_…")`, `os.environ["SR3D_…"]`, `os.getenv("SR3D_…")`) in service/, model/,
loadtests/ and tests/."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices

from service.settings import Settings, VLLMSettings

ROOT = Path(__file__).resolve().parents[1]
ENV_READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']((?:SR3D|REDIS|CUDA)_[A-Z0-9_]+)["']""")
NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start:end if end >= 0 else None]


def first_column_names(markdown: str) -> list[str]:
    """The backticked names in the first column of every table row (header and rule rows skipped)."""
    names = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            names += NAME.findall(line.split("|")[1])
    return names


def env_names(model: type, prefix: str) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        if name == "vllm":  # nested: VLLMSettings, with its own prefix
            continue
        alias = field.validation_alias
        out |= set(alias.choices) if isinstance(alias, AliasChoices) else {f"{prefix}{name.upper()}"}
    return out


def env_reads_in_code() -> set[str]:
    found = set()
    for folder in ("service", "model", "loadtests", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(ENV_READ.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_setting_is_in_the_readme_and_every_row_is_a_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = first_column_names(section(readme, "## Configuration"))
    documented += first_column_names(section(readme, "## vLLM engine"))
    assert len(documented) == len(set(documented)), f"listed twice: {sorted({n for n in documented if documented.count(n) > 1})}"
    settings = env_names(Settings, Settings.model_config["env_prefix"]) | env_names(
        VLLMSettings, VLLMSettings.model_config["env_prefix"])
    read_elsewhere = env_reads_in_code()
    assert {"SR3D_URL", "SR3D_API_KEY"} <= read_elsewhere  # the regex still sees the clients' reads
    expected = settings | read_elsewhere
    missing = sorted(expected - set(documented))
    unknown = sorted(set(documented) - expected)
    assert not missing, f"settings the README's tables do not list: {missing}"
    assert not unknown, f"README rows that are no setting (renamed or removed?): {unknown}"
