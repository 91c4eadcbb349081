"""Each `sr3d worker` announces itself in Redis: where its /metrics /healthz /readyz answer, which
GPU it was pinned to, whether its model is loaded. With SR3D_WORKER_METRICS_PORT=0 the port exists
only after bind; this hash (and the worker's log line) is where an operator or a service-discovery
job finds it.

  sr3d:worker:{consumer}   hash (keys.worker_key), expires REGISTRATION_TTL_PERIODS refresh periods
                           after the worker's last refresh: a SIGKILLed worker disappears by itself.

`redis-cli --scan --pattern 'sr3d:worker:*'` lists the live ones; `list_workers` reads them all.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from service import keys

log = logging.getLogger(__name__)

# A registration outlives this many missed refreshes (Redis briefly away, a stalled event loop).
REGISTRATION_TTL_PERIODS = 3


def metrics_address(bound_host: str, port: int) -> str:
    """host:port to scrape: a wildcard bind is reached through this host's name."""
    host = socket.gethostname() if bound_host in ("0.0.0.0", "::", "") else bound_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def registration(consumer: str, bound_host: str, port: int, port_rule: str, gpu: str | None) -> dict[str, str]:
    return {
        "consumer": consumer,
        "hostname": socket.gethostname(),
        "pid": str(os.getpid()),
        "metrics_host": bound_host,
        "metrics_port": str(port),
        "metrics_port_rule": port_rule,
        "metrics_url": f"http://{metrics_address(bound_host, port)}/metrics",
        "cuda_visible_devices": gpu or "",
        "started_at": f"{time.time():.3f}",  # unix seconds
        "state": "loading",
    }


async def register(redis: Any, fields: dict[str, str], ttl_s: float) -> None:
    key = keys.worker_key(fields["consumer"])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, int(ttl_s * 1000))
        await pipe.execute()


async def keep_registered(redis: Any, fields: dict[str, str], state: Callable[[], str], period_s: float) -> None:
    """Refresh the hash (and its `state`) every period_s until cancelled; Redis errors only log."""
    ttl_s = period_s * REGISTRATION_TTL_PERIODS
    while True:
        fields = {**fields, "state": state()}
        try:
            await register(redis, fields, ttl_s)
        except Exception:  # noqa: BLE001 - Redis restarting: the worker keeps serving, the next refresh retries
            log.warning("worker registration refresh failed", exc_info=True)
        await asyncio.sleep(period_s)


async def unregister(redis: Any, consumer: str) -> None:
    try:
        await redis.delete(keys.worker_key(consumer))
    except Exception:  # noqa: BLE001 - it expires by itself
        log.warning("could not remove the worker registration", exc_info=True)


async def list_workers(redis: Any) -> list[dict[str, str]]:
    """Every live worker's registration (decoded hash), in no particular order."""
    out = []
    async for key in redis.scan_iter(match=keys.worker_key("*"), count=100):
        fields = await redis.hgetall(key)
        if fields:
            out.append({(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                        for k, v in fields.items()})
    return out
