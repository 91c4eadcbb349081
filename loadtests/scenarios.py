"""The request mix of a load run: what real users of a region-prompted spatial VLM send.

- `video_regions`: a clip with 1-3 box regions on random sampled frames (the main workload)
- `image`: one still image with one region (the 2D/dynamic-tiling path)
- `repeat_video`: the same clip and question again and again (hits the point-map cache)
- `cancel`: a long answer the user gives up on after the first token (DELETE -> engine abort)
- `resume`: the connection drops after a few events and the client resumes with Last-Event-ID

Media are the real CC BY 4.0 fixtures the repository ships in tests/data/ (provenance and attribution in
tests/data/SOURCE.md), found relative to this file, so a run works from any clone and any working directory;
SR3D_FIXTURES may point at another folder with the same layout. The image is a real TUM frame downscaled so
that a CPU run spends its time in the service, not in PNG decoding.
"""
from __future__ import annotations

import io
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from service.client import JobRequest, JobResult, Media, SR3DClient

FIXTURES = Path(os.environ.get("SR3D_FIXTURES") or Path(__file__).resolve().parents[1] / "tests" / "data")
VIDEO = FIXTURES / "video" / "intel_bottles_tabletop_8s.mp4"
VIDEO_SIZE = (640, 360)  # w, h of the clip above
VIDEO_FRAMES = 250  # region `frame` indexes the upload's own frames (the worker samples around them)
IMAGE_SRC = FIXTURES / "rgbd" / "color" / "0000.png"

QUESTIONS = (
    "How far is <region0> from the camera?",
    "Is <region0> to the left of <region1>?",
    "What is the distance between <region0> and <region1>?",
    "Which is taller, <region0> or <region1>, and by how much?",
    "Among <region0>, <region1> and <region2>, which is closest to the camera?",
)


def fixture(path: Path) -> Path:
    """`path` under FIXTURES, or a clear error (an installed wheel has no tests/ folder)."""
    if not path.is_file():
        raise FileNotFoundError(f"load-test media {path} not found: run from a source checkout (tests/data/) "
                                "or set SR3D_FIXTURES to a folder with video/ and rgbd/color/ like tests/data/")
    return path


@lru_cache(maxsize=None)
def video_media() -> Media:
    return Media.from_path(fixture(VIDEO), "video")


@lru_cache(maxsize=None)
def image_media(width: int = 320) -> Media:
    from PIL import Image

    with Image.open(fixture(IMAGE_SRC)) as im:
        im = im.convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return Media("image", "frame.png", buf.getvalue(), "image/png")


def random_box(rng: random.Random, w: int, h: int) -> list[float]:
    bw, bh = rng.randint(w // 10, w // 3), rng.randint(h // 10, h // 3)
    x0, y0 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
    return [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]


def question_for(n_regions: int, rng: random.Random) -> str:
    fitting = [q for q in QUESTIONS if q.count("<region") == n_regions]
    return rng.choice(fitting)


@dataclass
class LoadConfig:
    max_tokens: int = 16
    num_frames: int = 4
    cancel_max_tokens: int = 256  # long enough that a cancel lands before the end


@dataclass
class Outcome:
    scenario: str
    result: JobResult
    expected: bool  # the job ended the way this scenario expects
    problems: list[str]


Scenario = Callable[[SR3DClient, random.Random, LoadConfig], Awaitable[Outcome]]


def _opts(cfg: LoadConfig, **extra: object) -> dict[str, object]:
    return {"max_tokens": cfg.max_tokens, "num_frames": cfg.num_frames, "temperature": 0.0, **extra}


def _video_request(rng: random.Random, cfg: LoadConfig, n_regions: int) -> JobRequest:
    w, h = VIDEO_SIZE
    regions = [[{"frame": rng.randrange(VIDEO_FRAMES), "box": random_box(rng, w, h)}] for _ in range(n_regions)]
    return JobRequest(video_media(), question_for(n_regions, rng), regions, options=_opts(cfg))


def _finish(name: str, res: JobResult, expected: bool) -> Outcome:
    problems = res.consistency_problems() if res.http_status == 200 or res.job_id else []
    if res.client_error:
        problems.append(res.client_error)
    return Outcome(name, res, expected and not problems, problems)


async def video_regions(c: SR3DClient, rng: random.Random, cfg: LoadConfig) -> Outcome:
    res = await c.run(_video_request(rng, cfg, rng.randint(1, 3)))
    return _finish("video_regions", res, res.ok)


async def image(c: SR3DClient, rng: random.Random, cfg: LoadConfig) -> Outcome:
    m = image_media()
    w, h = 320, 240
    req = JobRequest(m, question_for(1, rng), [[{"frame": 0, "box": random_box(rng, w, h)}]], options=_opts(cfg))
    res = await c.run(req)
    return _finish("image", res, res.ok)


async def repeat_video(c: SR3DClient, rng: random.Random, cfg: LoadConfig) -> Outcome:
    req = JobRequest(video_media(), QUESTIONS[0], [[{"frame": 0, "box": [250.0, 120.0, 330.0, 300.0]}]], options=_opts(cfg))
    res = await c.run(req)
    return _finish("repeat_video", res, res.ok)


async def cancel(c: SR3DClient, rng: random.Random, cfg: LoadConfig) -> Outcome:
    req = _video_request(rng, cfg, 1)
    req.options["max_tokens"] = cfg.cancel_max_tokens
    res = await c.run(req, cancel_after_tokens=1)
    return _finish("cancel", res, is_cancelled(res, cfg.cancel_max_tokens))


async def resume(c: SR3DClient, rng: random.Random, cfg: LoadConfig) -> Outcome:
    res = await c.run(_video_request(rng, cfg, 1), drop_after=3)
    return _finish("resume", res, res.ok)


def is_cancelled(res: JobResult, max_tokens: int) -> bool:
    """A cancel ends as an `error` {code: cancelled} or a `done` cut short by an abort (either is a valid design)."""
    t = res.terminal
    if t is None or not isinstance(t.data, dict):
        return False
    if t.type == "error":
        return t.data.get("code") == "cancelled"
    # the job may legitimately finish first when the model emits EOS early
    return t.data.get("finish_reason") in {"abort", "stop"} or res.completion_tokens < max_tokens


SCENARIOS: dict[str, Scenario] = {
    "video_regions": video_regions,
    "image": image,
    "repeat_video": repeat_video,
    "cancel": cancel,
    "resume": resume,
}

DEFAULT_MIX: dict[str, float] = {"video_regions": 0.45, "image": 0.2, "repeat_video": 0.15, "cancel": 0.1, "resume": 0.1}


def parse_mix(text: str | None) -> dict[str, float]:
    """"video_regions=3,image=1" -> weights; unknown names are an error, not silently dropped."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        mix[name] = float(w or 1)
    return mix


def pick(rng: random.Random, mix: dict[str, float]) -> str:
    names = list(mix)
    return rng.choices(names, weights=[mix[n] for n in names])[0]
