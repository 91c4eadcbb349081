"""A request's uploads are spooled to temp files while the body is parsed (starlette's multipart parser rolls
a part over 1 MiB to disk). Once the gateway has stored them (or refused the request), those files must be
closed: a streamed submit kept its media's temp file open for as long as the job's event stream lasted (the
request object, and with it the parsed form, lives until the response ends), so every open stream held its
upload's size of temp disk twice over. Real HTTP on loopback against a real Redis, no worker (the job stays
queued, its stream stays open)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_gateway
from tests.test_gateway_api import BOX
from tests.test_openai_api import png_bytes

pytestmark = pytest.mark.timeout(120)

BIG_PNG = png_bytes() + b"\0" * (3 * 1024 * 1024)  # past the parser's 1 MiB spool: a temp file on disk


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The gateway (a thread of this process) spools its uploads here."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


def open_spool_files(spool_dir: Path) -> list[str]:
    """This process's open files in `spool_dir` (unlinked temp files read '<dir>/#123 (deleted)')."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(spool_dir)):
            found.append(target)
    return found


def test_a_streamed_submits_upload_is_closed_once_stored(redis_url: str, spool_dir: Path) -> None:
    with run_gateway(redis_url) as base, httpx.Client(base_url=base, timeout=30) as c:
        with c.stream("POST", "/v1/spatial-qa", headers={"Accept": "text/event-stream"},
                      files={"image": ("scene.png", BIG_PNG, "image/png")},
                      data={"question": "How far is <region0> from the camera?", "regions": BOX}) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: queued"
            # The job is stored and its stream is open: the upload's temp file is closed.
            assert open_spool_files(spool_dir) == []

