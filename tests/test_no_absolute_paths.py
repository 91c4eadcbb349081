"""The reviewers' rule: no absolute filesystem paths in tracked code, docs or configs (issue 20).

The product must run from any clone in any directory, so nothing may name a place on one machine (a
shared fixtures folder, a home directory, a scratch disk). The same check by hand:

    git ls-files | grep -vE '^(Dockerfile|docker-compose\\.yml|deploy/|tests/test_deploy_|tests/data/|loadtests/results/)|\\.gitignore$' \\
      | xargs grep -nIE "(^|[[:space:]\\"'\\`(=,\\[])/(bin|boot|etc|home|lib|lib64|media|mnt|opt|root|run|sbin|srv|tmp|usr|var|work|data|models|app|Users|Volumes|private|workspace|scratch|nix)(/|\\b)" \\
      | grep -vE '#!/usr/bin/env|#!/bin/(ba)?sh|@[a-z_]+\\.(get|post|put|patch|delete|api_route)\\('

What counts: a `/` that starts a token (line start, after whitespace, a quote, a backtick, `(`, `=`, `,`
or `[`) followed by a top-level directory of a Linux or macOS filesystem from the list above (a slash, then
`work/...`, `tmp/x`, `home/me`, `data/ckpt`, `Users/me`). A Windows drive path (a drive letter, a colon, a
backslash, a folder, a backslash) counts too. This file is checked like any other: its own examples of
what the rule catches are built from parts at run time (`_p`), so no line of it names a machine path.

What does not: URLs (their slashes follow a scheme or a host name, not a token start); API routes such
as `/v1/spatial-qa`, `/healthz`, `/metrics` (not filesystem roots); repo-relative paths (`tests/data`);
the OS's own interfaces that are the same on every machine: `/dev/...`, `/proc/...`, `/sys/...` are not in
the list, and shebang lines and route decorators (`@router.get(...)`, whose argument is an HTTP path) are skipped.

Where absolute paths are right, and so exempt: the container and Kubernetes manifests, which describe the
image's own layout (`Dockerfile`, `docker-compose.yml`, `deploy/`), and their tests (`tests/test_deploy_*.py`
assert that layout); `.gitignore` (its leading `/` anchors a pattern at the repo root); recorded benchmark
output (`loadtests/results/`, logs of past runs); the media and their provenance notes (`tests/data/`).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROOTS = ("bin boot etc home lib lib64 media mnt opt root run sbin srv tmp usr var work data models app Users "
         "Volumes private workspace scratch nix").split()
ABSOLUTE = re.compile(r"(?:^|[\s\"'`(=,\[])(/(?:%s)(?:/[^\s\"'`),\]]*)?)(?=[\s\"'`),\]:;.]|$)" % "|".join(ROOTS))
WINDOWS = re.compile(r"(?:^|[\s\"'`(=,\[])([A-Za-z]:\\[\w .-]+\\)")  # drive, colon, backslash, folder, backslash
SHEBANG = re.compile(r"^#!\s*/")
ROUTE = re.compile(r"^\s*@\w+\.(?:get|post|put|patch|delete|api_route)\(")  # an HTTP route, not a file
EXEMPT = re.compile(r"^(Dockerfile|docker-compose\.yml|deploy/|tests/test_deploy_[a-z0-9_]+\.py|tests/data/|loadtests/results/)"
                    r"|(^|/)\.gitignore$")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed): the rule applies to tracked files")
    files = []
    for name in out.decode().split("\0"):
        if not name or EXEMPT.search(name):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" in head:  # binary
            continue
        files.append(path)
    return files


def violations(text: str) -> list[tuple[int, str]]:
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        if SHEBANG.match(line) or ROUTE.match(line):
            continue
        for rx in (ABSOLUTE, WINDOWS):
            hits += [(n, m.group(1)) for m in rx.finditer(line)]
    return hits


def _p(*parts: str) -> str:
    """An absolute POSIX path from its parts, so this file's examples are not machine paths in its text."""
    return "/" + "/".join(parts)


def test_the_rule_itself() -> None:
    bad = [f'FIXTURES = "{_p("work", "shared", "fixtures")}"', f"see {_p('work', 'shared', 'fixtures')}/*/SOURCE.md",
           f"--work-dir {_p('tmp', 'bench')}", f"path={_p('home', 'me', 'ckpt')}", f"ls {_p('data')}",
           f"(`{_p('Users', 'me', 'x')}`)", "C:" + "\\".join(["", "Users", "me"]), f"SR3D_MODEL={_p('models', 'sr3d')}"]
    good = ["https://github.com/intel-iot-devkit/sample-videos", "POST /v1/spatial-qa", "GET /healthz and /metrics",
            "tests/data/video/x.mp4", "#!/usr/bin/env bash", "> /dev/null 2>&1", "/proc/<pid>/stat", "req/s",
            "redis://127.0.0.1:6379/0", "$(VENV)/bin/python", "${HOME}/x", "a/tmp/b", "1 / 2", "./var/x"]
    assert [b for b in bad if not violations(b)] == []
    assert [g for g in good if violations(g)] == []


def test_no_absolute_filesystem_paths_in_tracked_files() -> None:
    found = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}:{n}: {hit}" for n, hit in violations(text)]
    assert found == [], "absolute filesystem paths (see this test's docstring for the rule):\n" + "\n".join(found)


def test_this_file_is_checked_like_any_other() -> None:
    """Issue 28: the rule's own examples used to be spelt as machine paths, so this file had to be exempt."""
    me = Path(__file__).resolve()
    assert not EXEMPT.search(me.relative_to(ROOT).as_posix())
    assert violations(me.read_text(encoding="utf-8")) == []
