"""Hold N concurrent SSE clients on one job of one gateway process, loopback only.

    python -m tests.sse_clients --clients 1000 [--hold 20] [--out DIR]

tests/test_gateway_streams.py drives 300 of them; run it by hand for the full thousand (the result
quoted in loadtests/RESULTS.md).

Starts its own redis-server and the real `sr3d gateway` (whose event streams all read through one
`service.stream_hub` per process), both on loopback. One job is queued through Jobs; N clients
open `GET /v1/spatial-qa/{id}/events` (raw asyncio sockets, ramped in steps of --ramp), hold for
--hold seconds, then the script writes 20 `token` events and `done` as a worker would. Prints JSON: HTTP statuses, streams that got their `queued` event, streams that got
`done` (the rest were dropped or never opened), the server's peak RSS and Redis connected_clients
while all streams were open.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


# ---- clients ----------------------------------------------------------------------------------------


class Client:
    def __init__(self) -> None:
        self.status: int | None = None
        self.queued = asyncio.Event()
        self.done = False
        self.error: str | None = None


async def run_client(port: int, path: str, c: Client) -> None:
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=1 << 20)
    except OSError as e:
        c.error = f"connect: {e}"
        c.queued.set()
        return
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        parts = line.split()
        c.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if c.status != 200:
            c.error = line.decode(errors="replace").strip() or "closed before a status line"
            return
        while True:
            line = await reader.readline()
            if not line:
                c.error = "stream ended without done"
                return
            if line.startswith(b"event: queued"):
                c.queued.set()
            elif line.startswith(b"event: done"):
                c.done = True
                return
    except (OSError, asyncio.IncompleteReadError) as e:
        c.error = f"{type(e).__name__}: {e}"
    finally:
        c.queued.set()
        writer.close()


async def drive(port: int, redis_url: str, server_pid: int, n: int, ramp: int, hold_s: float) -> dict[str, Any]:
    from service.local_stack import rss_bytes
    from service.jobs import Jobs
    from service.redis_conn import redis_client
    from service.schemas import JobSpec
    from service.settings import Settings

    r = redis_client(redis_url)
    q = Jobs(r, Settings(redis_url=redis_url, queue_max=100000))
    await q.ensure_group()
    jid = uuid.uuid4().hex
    await q.submit(JobSpec(job_id=jid, media_kind="image", media_blob=f"{jid}/media", media_hash="0" * 64,
                           media_filename="a.png", question="Where is it?", created_at=time.time()))
    path = f"/v1/spatial-qa/{jid}/events"
    clients = [Client() for _ in range(n)]
    tasks: list[asyncio.Task[None]] = []
    peak_rss = 0
    t0 = time.monotonic()
    for start in range(0, n, ramp):
        batch = clients[start:start + ramp]
        tasks += [asyncio.create_task(run_client(port, path, c)) for c in batch]
        await asyncio.wait_for(asyncio.gather(*(c.queued.wait() for c in batch)), 120)
        peak_rss = max(peak_rss, rss_bytes(server_pid) or 0)
    open_s = time.monotonic() - t0
    redis_clients = []
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        peak_rss = max(peak_rss, rss_bytes(server_pid) or 0)
        redis_clients.append(int((await r.info("clients"))["connected_clients"]))
        await asyncio.sleep(1.0)
    streaming = sum(1 for c in clients if c.status == 200 and c.error is None)
    for i in range(20):
        await q.append_event(jid, "token", {"text": f" t{i}"})
    await q.append_event(jid, "done", {"answer": "".join(f" t{i}" for i in range(20)), "usage": {}})
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    statuses = collections.Counter(str(c.status) for c in clients)
    errors = collections.Counter((c.error or "")[:60] for c in clients if c.error)
    await q.aclose()
    await q.blobs.aclose()
    await r.aclose()
    return {
        "clients": n, "http_status": dict(statuses), "open_seconds": round(open_s, 2),
        "streaming_after_hold": streaming, "got_done": sum(c.done for c in clients),
        "dropped_or_refused": n - sum(c.done for c in clients), "errors": dict(errors.most_common(5)),
        "server_peak_rss_mb": round(peak_rss / 2**20, 1),
        "redis_connected_clients_max": max(redis_clients or [0]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--ramp", type=int, default=100, help="clients opened per step")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds all streams stay open before the answer")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)

    from service.local_stack import Stack

    with tempfile.TemporaryDirectory() as d, Stack(Path(d), env={"SR3D_LOG_LEVEL": "WARNING"}) as st:
        st.start_redis()
        proc, url = st.start_gateway()
        st.wait_ready(url, proc, timeout=60)
        port = int(url.rsplit(":", 1)[1])
        result = asyncio.run(drive(port, st.redis_url, proc.pid, args.clients, args.ramp, args.hold))
        result = {"target": "gateway", **result, "server_alive": proc.alive()}
    print(json.dumps(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sse_clients_gateway.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
