"""Waiting for a condition in tests: poll it until it holds or a deadline passes, then fail saying what
was awaited and what was last seen. A test waits for a condition, never for luck: no fixed sleep as a
precondition, no reading a result before it exists. Deadlines are generous (a loaded 2-core box);
a passing test never waits them out.

Also the Redis-side facts the queue and stream-hub tests wait on: how long a pending stream entry
has been idle (XPENDING), which clients are blocked in which command (CLIENT LIST), and how many
times the server ran a command (INFO commandstats)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0


def wait_until(probe: Callable[[], T], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, period_s: float = 0.02) -> T:
    """Call `probe` until it returns something truthy; return that. AssertionError naming `what` and
    the last value seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = probe()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last seen: {seen!r})")
        time.sleep(period_s)


async def await_until(probe: Callable[[], Awaitable[T]], what: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                      period_s: float = 0.01) -> T:
    """`wait_until` for an async probe, on the running event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = await probe()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last seen: {seen!r})")
        await asyncio.sleep(period_s)


# ---- Redis facts ---------------------------------------------------------------------------------


async def pending_idle_ms(redis: Any, stream: str, group: str, entry_id: str) -> int | None:
    """Milliseconds since the entry was last delivered or claimed (XPENDING), None if not pending."""
    rows = await redis.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
    return int(rows[0]["time_since_delivered"]) if rows else None


async def wait_idle_past(redis: Any, stream: str, group: str, entry_id: str, idle_ms: int,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Until the pending entry has been idle longer than `idle_ms` (e.g. a consumer's claim_idle_ms:
    from then on XAUTOCLAIM may take it)."""

    async def idle_enough() -> bool:
        idle = await pending_idle_ms(redis, stream, group, entry_id)
        assert idle is not None, f"{entry_id} is no longer pending in {stream}/{group}"
        return idle > idle_ms

    await await_until(idle_enough, f"{stream} entry {entry_id} idle > {idle_ms} ms", timeout_s)


async def blocked_clients(redis: Any, command: str) -> list[dict[str, Any]]:
    """Connections the server holds blocked in `command` (CLIENT LIST: flag `b`, cmd name)."""
    return [c for c in await redis.client_list() if "b" in str(c.get("flags", "")) and c.get("cmd") == command]


async def command_calls(redis: Any, command: str) -> int:
    """How many times the server has run `command` (INFO commandstats; 0 if never)."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
