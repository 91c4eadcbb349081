"""The verdict of `sr3d bench workers` (no processes: the stack version is tests/test_faults_workers.py).

The bench exits non-zero when these checks find anything; here they must find what a broken queue would
produce: a job ended twice, a job the client gave up on, a job id handed to two clients, a killed job that
nobody reran."""
from __future__ import annotations

from types import SimpleNamespace

from loadtests.bench_workers import Killer, job_counts, job_problems, kill_problems
from service.client import JobResult, SSEEvent


def _job(job_id: str, *types: str, workers: tuple[int, ...] = (1,), status: int = 200) -> JobResult:
    events = [SSEEvent(f"1-{k}", "progress", {"stage": "started", "worker": f"host-{pid}"}, 0.0)
              for k, pid in enumerate(workers)]
    for t in types:
        data = {"text": "a"} if t == "token" else {"answer": "a" * sum(x == "token" for x in types)}
        events.append(SSEEvent(f"1-{len(events)}", t, data, 0.0))
    return JobResult(job_id=job_id, http_status=status, events=events)


def test_clean_jobs_and_rejections_pass() -> None:
    results = [_job("a", "token", "done"), _job("b", "token", "error"), JobResult(http_status=429)]
    assert job_problems(results) == []
    counts = job_counts(results, {1: 0})
    assert (counts["accepted"], counts["rejected"], counts["done"], counts["error"], counts["lost"]) == (2, 1, 1, 1, 0)
    assert counts["starts_by_worker"] == {"worker0": 2}


def test_duplicate_lost_and_shared_jobs_are_problems() -> None:
    twice = _job("a", "token", "done", "done")
    lost = _job("b", "token")
    lost.client_error = "gave up after 9 resumes in 180 s"
    shared = [_job("c", "token", "done"), _job("c", "token", "done")]
    problems = job_problems([twice, lost, *shared])
    assert any(p.startswith("job a:") and "terminal events" in p for p in problems), problems
    assert any(p.startswith("job b:") and "lost" in p for p in problems), problems
    assert "job c: seen by 2 clients" in problems
    assert job_counts([twice, lost], {})["lost"] == 1


def test_killed_job_must_be_rerun_elsewhere() -> None:
    killer = Killer(victim=SimpleNamespace(pid=7), arm_at=0.0, t0=0.0)  # type: ignore[arg-type]
    killer.job_id = "k"
    assert kill_problems([_job("k", "token", "done", workers=(7, 8))], killer) == []
    assert kill_problems([_job("k", "token", "done", workers=(7,))], killer) != []
    assert kill_problems([_job("k", "token", "error", workers=(7, 8))], killer) != []
    assert kill_problems([], killer) != []
    assert job_counts([_job("k", "token", "done", workers=(7, 8))], {7: 1, 8: 0})["redeliveries"] == 1
