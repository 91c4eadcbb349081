"""Issue 30's adversarial set, re-run against a real gateway process with two API keys.

    python -m loadtests.tenant_attack [--out loadtests/results/tenant_attack.json] [--cycles 4] [--seconds 8]
                                      [--rate 8] [--attack-period 2] [--pin | --apart] [--isolate]

Starts redis-server and the gateway (`sr3d gateway` with loadtests/gateway_probe.py's probes; no
worker: jobs stay queued, which is the worst case for the per-key job and byte quotas) on loopback,
with small quotas so each attack reaches its limit quickly.

keyB, in its own process, runs the same open loop in every window: 8 rounds a second (round k starts
at k/8 s, late only if the one before ran over), each round = upload a 152 B PNG, list models,
submit an image job, cancel it, delete the file, every request timed. keyB never holds more than one
file and one job, far inside its quotas, so any 429 it gets is a fairness failure (the report splits
keyB's refusals by error code, own-quota codes apart). Windows alternate, idle then under attack,
`--cycles` times after one warm-up pair that is not counted, so the machine's other load drifts
over both phases alike. Under attack keyA runs every repro of the issue at once, each one again every
`--attack-period` seconds for the whole window: an upload flood (11 x 8 MiB), a mask referenced 64
times (once), 12 MB chat bodies of 1 M regions, a gzip,gzip bomb from an allowlisted loopback
server, 20 unfinished 1 MiB request heads, 200 streams on its own job, 30 stalled uploads, a job
flood, a lone surrogate under an Idempotency-Key, 1,100-deep JSON, loose types, /metrics without a
key. keyB's cancelled jobs stay in the job stream (no worker reads them): the queue's room is counted
in jobs, not stream entries, so they cost its submits nothing.

Reported: requests tried, 5xx answers (must be 0), the gateway's peak RSS (VmRSS every 50 ms), peak
temp disk (its TMPDIR every 100 ms); per phase keyB's n and p50/p95/p99 overall and per request
kind (client side, and server side from the probe), its refusals by code, the event loop's lag,
where the loop thread was busy, the CPU share of the gateway (and of its loop thread), Redis, keyB
and this process (keyA), and the 1-minute load average at each window's ends. `--pin` puts the
gateway alone on CPU 0 and everything this tool starts on the others; `--apart` keyA's client on the upper
half of the CPUs and the gateway, Redis and keyB on the lower half; `--isolate` runs the gateway,
Redis and keyB at niceness -10, so that neither keyA's client nor anything else on the machine
takes their CPU (as if the attacker ran elsewhere): together with the default run they tell the
gateway's design from the machine's contention. `SR3D_ALLOW_PRIVATE_FETCH` is on only so that the
gateway may fetch from the tool's own loopback media server.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import http.server
import io
import json
import multiprocessing
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync
from PIL import Image

from loadtests.gateway_probe import SAMPLE_S
from loadtests.tenant_attack_plot import run_figure
from service.keys import JOBS
from service.local_stack import Stack, free_port, redis_server_binary, rss_bytes

KEY_A, KEY_B = "key-a-attacker", "key-b-bystander"
ENV = {"SR3D_API_KEYS": f"{KEY_A},{KEY_B}", "SR3D_QUOTA_STORED_MB": "32", "SR3D_QUOTA_JOBS": "16",
       "SR3D_QUOTA_STREAMS": "64", "SR3D_QUOTA_UPLOADS": "4", "SR3D_REMOTE_MEDIA_DOMAINS": "127.0.0.1",
       "SR3D_ALLOW_PRIVATE_FETCH": "true", "SR3D_LOG_LEVEL": "WARNING", "SR3D_HTTP_BODY_IDLE_S": "60"}


def png(extra: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 120, 30)).save(buf, format="PNG")
    return buf.getvalue() + b"\0" * extra


class Tally:
    """Every answer of every request, by status (0 = the connection was closed without one)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[int] = Counter()
        self.by_what: dict[str, Counter[int]] = {}
        self.fivexx: list[str] = []

    def record(self, what: str, r: httpx.Response | None) -> httpx.Response | None:
        code = r.status_code if r is not None else 0
        with self.lock:
            self.status[code] += 1
            self.by_what.setdefault(what, Counter())[code] += 1
            if code >= 500 and code != 504:  # 504 job_timeout is a chat wait with no worker, not a failure
                self.fivexx.append(f"{what}: {code} {r.text[:120] if r is not None else ''}")
        return r


class Sampler(threading.Thread):
    def __init__(self, pid: int, tmpdir: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.tmpdir = pid, tmpdir
        self.max_rss = 0
        self.max_tmp = 0
        self.stop = threading.Event()

    def tmp_bytes(self) -> int:
        """Bytes in the gateway's TMPDIR: named files, plus the unnamed ones it holds open (spooled
        uploads roll over into O_TMPFILE files, which no directory listing shows)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for root, _, files in os.walk(self.tmpdir):
            for f in files:
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(root, f))
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        fd_dir = f"/proc/{self.pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}").startswith(str(self.tmpdir)):
                        st = os.stat(f"{fd_dir}/{fd}")
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_size
        return total

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.max_rss = max(self.max_rss, rss_bytes(self.pid) or 0)
            if n % 2 == 0:
                self.max_tmp = max(self.max_tmp, self.tmp_bytes())
            n += 1
            time.sleep(0.05)


def media_server() -> tuple[http.server.ThreadingHTTPServer, str]:
    bomb = gzip.compress(gzip.compress(png(64 * 1024 * 1024)))  # ~64 KB on the wire, 64 MiB decoded

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip, gzip")
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *args: Any) -> None:
            return None

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/bomb.png"


def chat(url: str, text: str = "<region0>?", **extra: Any) -> dict[str, Any]:
    return {"model": "sr3d", "max_tokens": 4, "regions": [{"frame": 0, "box": [1, 1, 8, 8]}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                       {"type": "image_url", "image_url": {"url": url}}]}], **extra}


IMG_URL = "data:image/png;base64," + base64.b64encode(png()).decode()


KEYB_KINDS = ("upload", "models", "submit", "cancel", "delete")
# 429 codes of a key's own quotas (service/quotas.py): keyB's workload is built never to reach them
# (one file and one job held at a time, one body at a time), so one of these is a fairness failure too.
OWN_QUOTA_CODES = frozenset({"files_quota_exceeded", "storage_quota_exceeded", "jobs_quota_exceeded",
                             "uploads_quota_exceeded", "streams_quota_exceeded"})


def keyb_probe(base: str, seconds: float, rate: float, go: Any, out: Any) -> None:
    """keyB in its own process (the attack's client threads would otherwise share its GIL and
    inflate its latency). An open loop: round k starts at start + k / rate (late if the previous one
    ran over; the lateness is reported), for `seconds`, once `go` is set. A round = upload a 152 B
    PNG, list models, submit an image job, cancel it, delete the file: keyB never holds more than one
    file and one job, far inside its quotas. Sends back one record per request:
    (kind, wall start, seconds, status, error code or "") and the rounds' lateness."""
    records: list[tuple[str, float, float, int, str]] = []
    late: list[float] = []
    with httpx.Client(base_url=base, timeout=60) as c:
        c.get("/healthz")  # the connection is open before the clock starts
        go.wait()
        start = time.perf_counter()
        k = 0
        while (due := start + k / rate) < start + seconds:
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            late.append(max(0.0, time.perf_counter() - due))
            keyb_round(c, records)
            k += 1
    out.put((records, late))


def keyb_round(c: httpx.Client, records: list[tuple[str, float, float, int, str]]) -> None:
    h = {"Authorization": f"Bearer {KEY_B}"}

    def timed(what: str, call: Callable[[], httpx.Response]) -> httpx.Response | None:
        wall, t0 = time.time(), time.perf_counter()
        try:
            r: httpx.Response | None = call()
        except httpx.HTTPError:
            r = None
        took = time.perf_counter() - t0
        code = ""
        if r is not None and r.status_code >= 400:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                code = str(r.json()["error"]["code"])
        records.append((what, wall, took, r.status_code if r is not None else 0, code))
        return r

    f = timed("upload", lambda: c.post("/v1/files", headers=h, files={"file": ("a.png", png(), "image/png")},
                                       data={"purpose": "vision"}))
    timed("models", lambda: c.get("/v1/models", headers=h))
    j = timed("submit", lambda: c.post("/v1/spatial-qa", headers=h, files={"image": ("a.png", png(), "image/png")},
                                       data={"question": "How far is <region0>?", "regions": '[{"frame":0,"box":[1,1,8,8]}]'}))
    if j is not None and j.status_code == 202:
        timed("cancel", lambda: c.delete(f"/v1/spatial-qa/{j.json()['job_id']}", headers=h))
    if f is not None and f.status_code == 200:
        timed("delete", lambda: c.delete(f"/v1/files/{f.json()['id']}", headers=h))


def sock_status(s: socket.socket, timeout: float, tally: Tally, what: str) -> None:
    """Count the status a raw socket got (0 = none before the timeout, or closed without one)."""
    code = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        s.settimeout(timeout)
        got = s.recv(64)
        if got.startswith(b"HTTP/1."):
            code = int(got.split()[1])
    s.close()
    with tally.lock:
        tally.status[code] += 1
        tally.by_what.setdefault(what, Counter())[code] += 1
        if code >= 500:
            tally.fivexx.append(f"raw socket: {code}")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 1) if s else float("nan")


STREAM_JOB: dict[str, str] = {}  # keyA's job whose event stream its 200 connections follow


def attacks(base: str, bomb_url: str, tally: Tally) -> list[tuple[Callable[[], None], bool]]:
    """keyA's repros as (one pass, repeat it): every pass but the mask fan-out (a chat that waits for
    an answer no worker gives) runs again (every --attack-period) until the phase ends, so keyB is
    measured under attack for the whole phase, not in the quiet after the last repro."""
    h = {"Authorization": f"Bearer {KEY_A}"}
    host, port = base.removeprefix("http://").split(":")

    def req(what: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        try:
            r = httpx.request(method, f"{base}{path}", headers={**h, **kw.pop("headers", {})}, timeout=60, **kw)
        except httpx.HTTPError:
            r = None
        return tally.record(what, r)

    def upload_flood() -> None:
        for _ in range(11):
            req("upload 8 MiB", "POST", "/v1/files", files={"file": ("a.png", png(8 << 20), "image/png")},
                data={"purpose": "vision"})

    def mask_fanout() -> None:
        r = req("upload mask", "POST", "/v1/files", files={"file": ("m.png", png(1 << 20), "image/png")},
                data={"purpose": "vision"})
        if r is None or r.status_code != 200:
            return
        ref = f"sr3d-media://{r.json()['id']}"
        body = chat(IMG_URL, " ".join(f"<region{k}>" for k in range(8)),
                    regions=[[{"frame": 0, "mask": ref}] * 8 for _ in range(8)])
        req("mask x64", "POST", "/v1/chat/completions", json=body)

    huge = json.dumps(chat(IMG_URL, regions=[[0, 0, 0, 0]] * 1_000_000)).encode()

    def huge_chat() -> None:
        body = huge
        for _ in range(2):
            req("12 MB chat", "POST", "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})

    def gzip_bomb() -> None:
        req("gzip bomb", "POST", "/v1/chat/completions", json=chat(bomb_url))

    def big_heads() -> None:
        socks = []
        for _ in range(20):
            with contextlib.suppress(OSError):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * (1 << 20))
                socks.append(s)
        for s in socks:
            sock_status(s, 10, tally, "1 MiB head")

    def streams() -> None:
        # One job for every pass and window, submitted before the attacks (main): a new one per pass was
        # refused once the upload or job flood held keyA's quotas, and the streams then did not run at all.
        url = f"{base}/v1/spatial-qa/{STREAM_JOB['id']}/events"
        with contextlib.ExitStack() as stack:
            c = stack.enter_context(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=300)))
            for _ in range(200):
                try:
                    resp = stack.enter_context(c.stream("GET", url, headers=h))
                    tally.record("stream", resp)
                except httpx.HTTPError:
                    tally.record("stream", None)
            time.sleep(3)  # hold them open while keyB works

    def stalled_uploads() -> None:
        socks = []
        for _ in range(30):
            with contextlib.suppress(OSError):
                s = socket.create_connection((host, int(port)))
                s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\nContent-Type: "
                          f"multipart/form-data; boundary=bb\r\nContent-Length: {8 << 20}\r\n\r\n--bb\r\n".encode()
                          + b"Content-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + png(1 << 16))
                socks.append(s)
        time.sleep(3)  # the first SR3D_QUOTA_UPLOADS are still being received: no answer (0); the rest got 429
        for s in socks:
            sock_status(s, 0.5, tally, "stalled upload")

    def job_flood() -> None:
        for _ in range(40):
            req("job flood", "POST", "/v1/spatial-qa", files={"image": ("a.png", png(), "image/png")},
                data={"question": "<region0>?", "regions": '[{"frame":0,"box":[1,1,8,8]}]'})

    def small_repros() -> None:
        body = json.dumps(chat(IMG_URL, "\ud800 <region0>")).encode()
        req("surrogate", "POST", "/v1/chat/completions", content=body,
            headers={"Content-Type": "application/json", "Idempotency-Key": "poison"})
        deep = "[" * 1100 + "]" * 1100
        req("deep json", "POST", "/v1/chat/completions", content=json.dumps(chat(IMG_URL))[:-1].encode()
            + f', "num_frames": {deep}}}'.encode(), headers={"Content-Type": "application/json"})
        for field, value in (("max_tokens", True), ("n", "1"), ("temperature", "0.5")):
            req(f"loose {field}", "POST", "/v1/chat/completions", json=chat(IMG_URL, **{field: value}))
        req("region00", "POST", "/v1/chat/completions", json=chat(IMG_URL, "<region00>?"))
        tally.record("metrics without key", httpx.get(f"{base}/metrics", timeout=10))

    return [(upload_flood, True), (mask_fanout, False), (huge_chat, True), (gzip_bomb, True), (big_heads, True),
            (streams, True), (stalled_uploads, True), (job_flood, True), (small_repros, True)]


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (and the threads it starts later) to `cpus` (taskset -a -p)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def boost(pid: int, nice: int = -10) -> None:
    """Every thread of `pid` (and the threads it starts later) to niceness `nice` (root only)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 0.5), "p95": pct(xs, 0.95), "p99": pct(xs, 0.99), "max": pct(xs, 1.0)}


def keyb_report(records: list[tuple[str, float, float, int, str]], late: list[float]) -> dict[str, Any]:
    codes: Counter[str] = Counter(f"{st} {code}".strip() for _, _, _, st, code in records if st >= 400 or st == 0)
    return {
        "all": stats([r[2] for r in records]),
        "by_kind": {k: stats([r[2] for r in records if r[0] == k]) for k in KEYB_KINDS},
        "round_start_late_ms": {"p50": pct(late, 0.5), "p99": pct(late, 0.99), "max": pct(late, 1.0)},
        "status_counts": dict(Counter(str(r[3]) for r in records)),
        "refused_by_code": dict(codes),
        "refused_own_quota": sum(1 for r in records if r[4] in OWN_QUOTA_CODES),
        "refused_other": sum(1 for r in records if (r[3] >= 400 or r[3] == 0) and r[4] not in OWN_QUOTA_CODES),
    }


def probe_report(path: Path, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """The gateway probe's records (loadtests/gateway_probe.py) inside the given wall-time windows."""
    lags: list[float] = []
    collections: dict[int, list[float]] = {}
    server: dict[str, list[float]] = {}
    busy: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if not any(t0 <= rec["t"] <= t1 for t0, t1 in windows):
                    continue
                if "lag" in rec:
                    lags.append(rec["lag"])
                elif "gc" in rec:
                    collections.setdefault(rec["gc"], []).append(rec["s"])
                elif "req" in rec and rec["key"] == KEY_B[-4:]:
                    server.setdefault(rec["req"].split("/file-")[0].split("/spatial-qa/")[0], []).append(rec["s"])
                elif "busy" in rec:
                    busy[rec["busy"]] += 1
                    leaf[rec["leaf"]] += 1
    span = max(sum(t1 - t0 for t0, t1 in windows), 1e-9)
    samples = sum(busy.values())
    return {
        "loop_lag_ms": {**stats(lags), "over_5ms": sum(1 for x in lags if x > 0.005)},
        # Garbage collections by generation: count and pause (a full one holds the loop for its whole walk).
        "gc_pause_ms": {f"gen{g}": {**stats(v), "total": round(sum(v) * 1000, 1)} for g, v in sorted(collections.items())},
        "keyB_server_ms": {k: stats(v) for k, v in sorted(server.items())},
        "keyB_server_all_ms": stats([x for v in server.values() for x in v]),
        # Share of the 2 ms samples in which the loop thread was not waiting for I/O, and where it was.
        "loop_busy_share": round(samples * SAMPLE_S / span, 3),
        "loop_busy_top": dict(busy.most_common(12)),
        "loop_leaf_top": dict(leaf.most_common(12)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seconds", type=float, default=8, help="keyB's measured time per window")
    ap.add_argument("--cycles", type=int, default=4,
                    help="idle window, then attack window, this many times (the machine's other load drifts: "
                         "alternating spreads it over both phases)")
    ap.add_argument("--rate", type=float, default=8, help="keyB rounds per second (5 requests each), both phases")
    ap.add_argument("--attack-period", type=float, default=2.0,
                    help="each repro starts again this many seconds after its last start (or when it ends, if later); "
                         "0 = back to back, a flood bounded only by this process's CPU")
    ap.add_argument("--pin", action="store_true",
                    help="the gateway alone on CPU 0; Redis, keyA, keyB and this tool on the other CPUs")
    ap.add_argument("--apart", action="store_true",
                    help="keyA's client (this process) on the upper half of the CPUs, the gateway, Redis and keyB on "
                         "the lower half: the attacker cannot take the service's CPU, as if it ran on another "
                         "machine, while keyB shares the gateway's CPUs in both phases alike")
    ap.add_argument("--isolate", action="store_true",
                    help="the gateway, Redis and keyB at niceness -10 (needs root): keyA's client and whatever else "
                         "runs on the machine cannot take their CPU, as if the attacker ran on another machine")
    ap.add_argument("--no-stacks", action="store_true",
                    help="run the gateway without the probe's stack sampler (its GIL hand-offs every 2 ms weigh "
                         "more on a busier loop): latency as a user gets it, without 'where the loop was busy'")
    ap.add_argument("--skip", default="",
                    help="comma-separated repros to leave out (function names in attacks(), e.g. streams,huge_chat): "
                         "which part of the attack costs keyB what")
    args = ap.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    tally = Tally()
    srv, bomb_url = media_server()
    ncpu = os.cpu_count() or 1
    if args.pin:
        assert ncpu >= 2, "--pin needs 2 CPUs"
        os.sched_setaffinity(0, set(range(1, ncpu)))  # this process; keyB's and the attack's threads inherit it
    service_cpus, attacker_cpus = set(range(ncpu // 2)), set(range(ncpu // 2, ncpu))
    if args.apart:
        assert ncpu >= 2 and not args.pin, "--apart needs 2 CPUs and excludes --pin"
        os.sched_setaffinity(0, attacker_cpus)
    with tempfile.TemporaryDirectory(prefix="sr3d-attack-") as work:
        tmp = Path(work) / "tmp"
        tmp.mkdir()
        probe_out = Path(work) / "probe.jsonl"
        with Stack(Path(work), {**ENV, "TMPDIR": str(tmp)}) as st:
            redis_proc = st.start_redis()
            redis_version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                                           check=False).stdout.strip()
            port = free_port()
            proc = st.start_module("gateway", "loadtests.gateway_probe", {
                "SR3D_HOST": "127.0.0.1", "SR3D_PORT": str(port), "PROBE_OUT": str(probe_out),
                "PROBE_STACKS": "0" if args.no_stacks else "1"})
            base = f"http://127.0.0.1:{port}"
            st.wait_ready(base, proc)
            if args.pin:
                pin(proc.pid, {0})
                pin(redis_proc.pid, set(range(1, ncpu)))
            if args.apart:
                pin(proc.pid, service_cpus)
                pin(redis_proc.pid, service_cpus)
            if args.isolate:
                boost(proc.pid)
                boost(redis_proc.pid)
            sampler = Sampler(proc.pid, tmp)
            sampler.start()
            ctx = multiprocessing.get_context("spawn")
            pids = {"gateway": proc.pid, "redis": redis_proc.pid, "keyA_and_tool": os.getpid()}

            def window(attack: bool, first: bool) -> dict[str, Any]:
                go, out = ctx.Event(), ctx.Queue()
                p = ctx.Process(target=keyb_probe, args=(base, args.seconds, args.rate, go, out))
                p.start()
                if args.apart:
                    pin(p.pid, service_cpus)
                if args.isolate:
                    boost(p.pid)
                stop = threading.Event()
                threads = []
                if attack:
                    def loop(fn: Callable[[], None], repeat: bool) -> None:
                        while True:
                            t = time.perf_counter()
                            fn()
                            if not repeat or stop.wait(max(0.0, t + args.attack_period - time.perf_counter())):
                                return
                    # The mask fan-out's chat waits for an answer no worker gives: once, not joined.
                    threads = [threading.Thread(target=loop, args=a, daemon=True, name="repeat" if a[1] else "once")
                               for a in attacks(base, bomb_url, tally) if (a[1] or first) and a[0].__name__ not in skip]
                    for t in threads:
                        t.start()
                    time.sleep(2)  # every repro under way before keyB's clock starts
                cpu0 = {k: cpu_s(v) for k, v in pids.items()} | {"gateway_loop_thread": cpu_s(proc.pid, proc.pid),
                                                                  "keyB": cpu_s(p.pid)}
                load0, t0, w0 = os.getloadavg()[0], time.perf_counter(), time.time()
                go.set()
                records, late = out.get(timeout=args.seconds + 600)
                t1, w1 = time.perf_counter(), time.time()
                cpu1 = {k: cpu_s(v) for k, v in pids.items()} | {"gateway_loop_thread": cpu_s(proc.pid, proc.pid),
                                                                  "keyB": cpu_s(p.pid)}
                p.join()
                stop.set()
                for t in threads:
                    if t.name != "once":
                        t.join(timeout=60)
                time.sleep(1.0)  # the attack's last requests are answered; the probe's records reach its file
                return {"records": records, "late": late, "window": (w0, w1), "seconds": t1 - t0,
                        "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0}, "load": (load0, os.getloadavg()[0])}

            # keyA's job for the 200 streams, before anything fills keyA's quotas (its upload flood fills
            # the bytes it may hold, its job flood the jobs), so that repro runs in every pass of every window.
            r = httpx.post(f"{base}/v1/spatial-qa", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30,
                           files={"image": ("a.png", png(), "image/png")},
                           data={"question": "<region0>?", "regions": '[{"frame":0,"box":[1,1,8,8]}]'})
            STREAM_JOB["id"] = r.json()["job_id"]
            # Warm-up, not counted: first-use costs of the gateway process (imports on first use,
            # connection pools, the TLS context of the first remote fetch) are paid once per process.
            window(attack=False, first=False)
            idle_rss = sampler.max_rss
            window(attack=True, first=True)
            windows: dict[str, list[dict[str, Any]]] = {"idle": [], "under_attack": []}
            for _ in range(args.cycles):
                windows["idle"].append(window(attack=False, first=False))
                windows["under_attack"].append(window(attack=True, first=False))
            sampler.stop.set()
            sampler.join()
            with redis_sync.Redis.from_url(st.redis_url) as r:
                stream_entries = int(r.xlen(JOBS))  # cancelled jobs no worker read: left in the stream
            alive = proc.alive()
            root = str(Path(__file__).resolve().parents[1])
            errors = [line.replace(root, ".") for line in proc.log_path.read_text(errors="replace").splitlines()
                      if "ERROR" in line or "Traceback" in line]
            phases: dict[str, Any] = {}
            for name, ws in windows.items():
                secs = sum(w["seconds"] for w in ws)
                phases[name] = {
                    "seconds": round(secs, 1),
                    "loadavg_1min": [round(x, 2) for w in ws for x in w["load"]],
                    "cpu_share": {k: round(sum(w["cpu"][k] for w in ws) / secs, 3) for k in ws[0]["cpu"]},
                    "keyB_client_ms": keyb_report([r for w in ws for r in w["records"]], [x for w in ws for x in w["late"]]),
                    "keyB_client_p99_by_window": [pct([r[2] for r in w["records"]], 0.99) for w in ws],
                    "gateway": probe_report(probe_out, [w["window"] for w in ws]),
                }
    srv.shutdown()
    b_idle, b_att = phases["idle"]["keyB_client_ms"], phases["under_attack"]["keyB_client_ms"]
    for ph in (b_idle, b_att):
        tally.status.update({int(k): v for k, v in ph["status_counts"].items()})
    report = {
        "settings": {"seconds_per_window": args.seconds, "cycles": args.cycles, "rate_rounds_per_s": args.rate,
                     "skipped": sorted(skip), "stack_sampler": not args.no_stacks,
                     "attack_period_s": args.attack_period, "pinned": args.pin, "apart": args.apart, "isolated": args.isolate,
                     "quota_env": ENV},
        "requests_tried": sum(tally.status.values()),
        "status_counts": {str(k): v for k, v in sorted(tally.status.items())},
        "by_request": {w: {str(k): v for k, v in sorted(c.items())} for w, c in sorted(tally.by_what.items())},
        "machine": {"cpus": ncpu, "note": "a shared box: see loadavg_1min per window; the ratio is what counts"},
        "fivexx": len(tally.fivexx), "fivexx_examples": tally.fivexx[:5],
        "job_stream_entries_at_end": stream_entries,
        "gateway_alive_after": alive,
        "gateway_rss_mb": {"idle_max": round(idle_rss / 2**20, 1), "max": round(sampler.max_rss / 2**20, 1)},
        "temp_disk_max_mb": round(sampler.max_tmp / 2**20, 1),
        "keyB_p99_ratio": round(b_att["all"]["p99"] / b_idle["all"]["p99"], 2),
        "keyB_p99_ratio_by_kind": {k: round(b_att["by_kind"][k]["p99"] / b_idle["by_kind"][k]["p99"], 2)
                                   for k in KEYB_KINDS if b_idle["by_kind"][k]["n"]},
        "keyB_server_p99_ratio": round(phases["under_attack"]["gateway"]["keyB_server_all_ms"]["p99"]
                                       / phases["idle"]["gateway"]["keyB_server_all_ms"]["p99"], 2),
        "redis_server": redis_version,
        "phases": phases,
        # Tracebacks the gateway logged (each one cost the event loop its formatting); paths relative.
        "gateway_log_errors": {"lines": len(errors), "first": errors[0][:240] if errors else None},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(run_figure(report, args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
