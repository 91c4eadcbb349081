"""Issue 30's adversarial set, re-run against a real gateway process with two API keys.

    python -m loadtests.tenant_attack [--out loadtests/results/tenant_attack.json] [--seconds 20]

Starts redis-server and `sr3d gateway` (no worker: jobs stay queued, which is the worst case for the
per-key job and byte quotas) on loopback, with small quotas so each attack reaches its limit quickly.
keyB measures its latency (upload a 152 B PNG, list models, submit an image job, cancel it, delete
the file: each request timed) first alone, then while keyA runs every repro of the issue at once:
an upload flood, a mask referenced 64 times, 12 MB chat bodies of 1 M regions, a gzip,gzip bomb from an
allowlisted loopback server, 20 unfinished 1 MiB request heads, 200 streams on its own job, 30 stalled
uploads, a job flood, a lone surrogate under an Idempotency-Key, 1,100-deep JSON, loose types and
/metrics without a key. Reported: requests tried, 5xx answers (must be 0), the gateway's peak RSS
(VmRSS sampled every 50 ms), peak temp disk (the gateway's TMPDIR, sampled every 100 ms) and keyB's
p50/p99 idle versus under attack. `SR3D_ALLOW_PRIVATE_FETCH` is on only so that the gateway may
fetch from the tool's own loopback media server.
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
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from service.local_stack import Stack, rss_bytes

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


def keyb_probe(base: str, rounds: int, stop: Any, out: Any) -> None:
    """keyB in its own process (the attack's client threads would otherwise share its GIL and
    inflate its latency): `rounds` rounds, or rounds until `stop` is set when rounds is 0.
    Sends (latencies, status counts, 5xx examples) back through `out`."""
    tally, lat = Tally(), []
    with httpx.Client(base_url=base, timeout=60) as c:
        n = 0
        while (n < rounds) if rounds else not stop.is_set():
            keyb_round(c, tally, lat)
            n += 1
    out.put((lat, dict(tally.status), tally.fivexx))


def keyb_round(c: httpx.Client, tally: Tally, lat: list[float]) -> None:
    h = {"Authorization": f"Bearer {KEY_B}"}

    def timed(what: str, call: Callable[[], httpx.Response]) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = call()
        except httpx.HTTPError:
            r = None
        lat.append(time.perf_counter() - t0)
        return tally.record(f"keyB {what}", r)

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


def attacks(base: str, bomb_url: str, tally: Tally) -> list[Callable[[], None]]:
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

    def huge_chat() -> None:
        body = json.dumps(chat(IMG_URL, regions=[[0, 0, 0, 0]] * 1_000_000)).encode()
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
        r = req("submit", "POST", "/v1/spatial-qa", files={"image": ("a.png", png(), "image/png")},
                data={"question": "<region0>?", "regions": '[{"frame":0,"box":[1,1,8,8]}]'})
        if r is None or r.status_code != 202:
            return
        url = f"{base}/v1/spatial-qa/{r.json()['job_id']}/events"
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

    return [upload_flood, mask_fanout, huge_chat, gzip_bomb, big_heads, streams, stalled_uploads, job_flood,
            small_repros]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rounds", type=int, default=30, help="keyB rounds while idle (5 requests each)")
    args = ap.parse_args()
    tally = Tally()
    srv, bomb_url = media_server()
    with tempfile.TemporaryDirectory(prefix="sr3d-attack-") as work:
        tmp = Path(work) / "tmp"
        tmp.mkdir()
        with Stack(Path(work), {**ENV, "TMPDIR": str(tmp)}) as st:
            st.start_redis()
            proc, base = st.start_gateway()
            st.wait_ready(base, proc)
            sampler = Sampler(proc.pid, tmp)
            sampler.start()
            ctx = multiprocessing.get_context("spawn")
            stop, out = ctx.Event(), ctx.Queue()

            def probe(rounds: int) -> list[float]:
                p = ctx.Process(target=keyb_probe, args=(base, rounds, stop, out))
                p.start()
                return p  # type: ignore[return-value]

            def collect(p: Any) -> list[float]:
                lat, status, fivexx = out.get(timeout=600)
                p.join()
                with tally.lock:
                    tally.status.update({int(k): v for k, v in status.items()})
                    tally.by_what.setdefault("keyB", Counter()).update({int(k): v for k, v in status.items()})
                    tally.fivexx += fivexx
                return lat

            idle = collect(probe(args.rounds))
            idle_rss = sampler.max_rss
            threads = [threading.Thread(target=a, daemon=True) for a in attacks(base, bomb_url, tally)]
            p = probe(0)
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            attacked = collect(p)
            sampler.stop.set()
            sampler.join()
            alive = proc.alive()
    srv.shutdown()
    report = {
        "requests_tried": sum(tally.status.values()),
        "status_counts": {str(k): v for k, v in sorted(tally.status.items())},
        "by_request": {w: {str(k): v for k, v in sorted(c.items())} for w, c in sorted(tally.by_what.items())
                       if not w.startswith("keyB")},
        "keyB_status_counts": {str(k): v for k, v in sorted(tally.by_what.get("keyB", Counter()).items())},
        "machine": {"cpus": os.cpu_count(), "note": "numbers are from whatever else runs on this machine too"},
        "fivexx": len(tally.fivexx), "fivexx_examples": tally.fivexx[:5],
        "gateway_alive_after": alive,
        "gateway_rss_mb": {"idle_max": round(idle_rss / 2**20, 1), "max": round(sampler.max_rss / 2**20, 1)},
        "temp_disk_max_mb": round(sampler.max_tmp / 2**20, 1),
        "keyB_ms": {"idle": {"n": len(idle), "p50": pct(idle, 0.5), "p99": pct(idle, 0.99)},
                    "under_attack": {"n": len(attacked), "p50": pct(attacked, 0.5), "p99": pct(attacked, 0.99)}},
    }
    report["keyB_p99_ratio"] = round(report["keyB_ms"]["under_attack"]["p99"] / report["keyB_ms"]["idle"]["p99"], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
