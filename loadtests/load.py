"""How load is offered to a service: closed-loop users or open-loop (Poisson) arrivals over a scenario mix.

`sr3d bench service` runs levels of either; the soak run (loadtests/soak.py) runs one closed loop for
a long time. A scenario that raises is recorded as a failed outcome: a load generator does not stop.
"""
from __future__ import annotations

import asyncio
import random
import time

from loadtests.scenarios import SCENARIOS, LoadConfig, Outcome, pick
from service.client import JobResult, SR3DClient


async def _one(client: SR3DClient, name: str, rng: random.Random, cfg: LoadConfig) -> Outcome:
    try:
        return await SCENARIOS[name](client, rng, cfg)
    except Exception as e:  # noqa: BLE001 - a load generator records failures, it does not stop on them
        res = JobResult(t_submit=time.perf_counter(), client_error=f"{type(e).__name__}: {e}")
        return Outcome(name, res, False, [res.client_error or ""])


async def closed_loop(url: str, users: int, duration: float, mix: dict[str, float], cfg: LoadConfig,
                      seed: int, api_key: str | None = None) -> tuple[list[Outcome], float]:
    """`users` concurrent users, each looping until `duration` is over; returns (outcomes, wall seconds)."""
    outcomes: list[Outcome] = []
    async with SR3DClient(url, api_key=api_key) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline:
                outcomes.append(await _one(client, pick(rng, mix), rng, cfg))

        await asyncio.gather(*(user(i) for i in range(users)))
        return outcomes, time.perf_counter() - t0


async def open_loop(url: str, rate: float, duration: float, mix: dict[str, float], cfg: LoadConfig,
                    seed: int, api_key: str | None = None) -> tuple[list[Outcome], float]:
    """Poisson arrivals at `rate`/s for `duration` s (arrivals never wait for answers)."""
    rng = random.Random(seed)
    async with SR3DClient(url, api_key=api_key) as client:
        t0 = time.perf_counter()
        tasks = []
        t_next = t0
        while t_next < t0 + duration:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            sub = random.Random(rng.random())
            tasks.append(asyncio.create_task(_one(client, pick(rng, mix), sub, cfg)))
            t_next += rng.expovariate(rate)
        outcomes = list(await asyncio.gather(*tasks))
        return outcomes, time.perf_counter() - t0
