"""`sr3d bench ceiling`: a tiny real run (redis-server, `sr3d gateway`, one echo worker, SSE clients on
loopback) must give the report's shape and sane numbers; the pieces it rests on (the padded upload, the
CPU counter, the break rule) are checked on their own."""
from __future__ import annotations

import argparse
import json
import struct
import time

import av

from loadtests import bench_ceiling as bc
from loadtests.scenarios import VIDEO


def _args(**over: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bc.add_arguments(p)
    args = p.parse_args([])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_padded_upload_is_the_clip_plus_a_free_box(tmp_path) -> None:
    clip = VIDEO.read_bytes()
    m = bc.padded_clip(1.0)
    assert len(m.content) == 1_000_000 and m.content.startswith(clip)
    size, kind = struct.unpack(">I4s", m.content[len(clip):len(clip) + 8])
    assert (size, kind) == (1_000_000 - len(clip), b"free")
    path = tmp_path / "padded.mp4"
    path.write_bytes(m.content)

    def frames(p: object) -> int:
        with av.open(str(p)) as c:
            return sum(1 for _ in c.decode(video=0))

    assert frames(path) == frames(VIDEO)  # the decoder skips the padding
    assert bc.padded_clip(0).content == clip


def test_cpu_seconds_counts_this_process() -> None:
    import os

    before = bc.cpu_seconds(os.getpid())
    t_end = time.process_time() + 0.2
    while time.process_time() < t_end:
        pass
    assert bc.cpu_seconds(os.getpid()) - before >= 0.1


def test_break_rule() -> None:
    args = _args(max_error_rate=0.01, max_p99_ratio=3.0)
    first = {"error_rate": 0.0, "rejected": {}, "e2e_s": {"p99": 1.0}}
    assert bc.broken(first, first, args) is None
    assert "e2e p99" in bc.broken({**first, "e2e_s": {"p99": 3.5}}, first, args)
    assert "error rate" in bc.broken({**first, "error_rate": 0.05, "rejected": {"429": 3}}, first, args)


def test_tiny_ramp_through_the_real_stack(tmp_path) -> None:
    out = tmp_path / "out"
    args = _args(rates="3,6", duration=2.0, upload_mb="1", blob_stores="redis", workers=1, worker_concurrency=16,
                 max_tokens=8, token_delay_s=0.005, first_token_delay_s=0.2, max_p99_ratio=1000.0, out=str(out))
    assert bc.run(args) == 0
    report = json.loads((out / "ceiling.json").read_text())
    assert (out / "ceiling.png").stat().st_size > 0
    (run,) = report["runs"]
    assert run["blob_store"] == "redis" and run["upload_mb"] == 1.0 and run["upload_bytes"] == 1_000_000
    assert [lv["offered_req_per_s"] for lv in run["levels"]] == [3.0, 6.0]
    for lv in run["levels"]:
        assert lv["requests"] > 0 and lv["done"] == lv["requests"] and lv["error_rate"] == 0 and not lv["problems"]
        # started, decode, pointmaps, measure, encode, >= 1 token, done: every job's events reached its client
        assert lv["events_per_request"] >= 7
        assert 0 < lv["e2e_s"]["p50"] <= lv["e2e_s"]["p99"] < 30
        assert lv["upload_mb_per_s"] > 0 and lv["events_per_s"] > 0
        assert set(lv["cpu"]) == {"gateway", "redis", "workers", "client"}
        for name, c in lv["cpu"].items():
            assert c["cpu_s"] > 0 and c["ms_per_request"] > 0, (name, c)
    ceiling = run["ceiling"]
    assert ceiling["first_to_saturate"] in ("gateway", "redis")
    assert ceiling["req_per_s"] == ceiling["per_process"][ceiling["first_to_saturate"]]["req_per_s_per_core"] > 0
    assert ceiling["per_process"]["gateway"]["max_cores"] == 1
