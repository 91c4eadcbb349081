"""The page at `/` in a real browser: Debian's Chromium (the `chromium` package, headless) driven by
Playwright's Python package against a real `sr3d serve` on loopback (embedded Redis, in-process
worker, tiny checkpoint and depth model). No browser is downloaded; `.ci/run` installs Chromium.

What a person does is what the test does: choose the sample clip, pick a frame from the strip, drag
a box with the mouse, pick another frame, drag a second box, ask "How far is <region0> from
<region1>?", watch the stages and tokens, read the answer (it must equal the API's), then turn the
3D scene with the mouse. The page's real Content-Security-Policy stays on (waits use selectors, not
page-side eval). Screenshots land in bench-out/web/ (kept by CI as artefacts).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e_helpers import BOTTLE_NAME, SERVE_ENV, find_fixture

pytestmark = pytest.mark.timeout(600)

# Playwright's own launch flags plus what a locked-down CI container needs; nothing reaches the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "bench-out" / "web"
VIEWPORT = {"width": 1440, "height": 1000}


def _chromium() -> str:
    """Debian's Chromium; installed here with apt-get when missing and this process may (root)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env, capture_output=True,
                       timeout=900)
    found = shutil.which("chromium")
    if not found:
        pytest.skip("Debian's chromium is not installed (no `chromium` on PATH) and apt-get could not install it")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (test extras) is missing")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from loadtests.stack import serve_stack

    with serve_stack(tmp_path_factory.mktemp("serve-web"), SERVE_ENV) as (_, url):
        yield url


class PageLog:
    """Console errors and uncaught exceptions of a page (a CSP violation shows up here)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def unexpected(self) -> list[str]:
        # The key probe (GET of a job id that does not exist) is answered 404 (keys off) or 401 (keys on) by design.
        return [e for e in self.errors if not ("Failed to load resource" in e and ("404" in e or "401" in e))]


def shot(page: Any, name: str, **kw: Any) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **kw)
    return path


def drag_box(page: Any, box: tuple[float, float, float, float]) -> None:
    """Mouse-drag a box given in pixels of the video frame, through the canvas' on-screen geometry."""
    left, top, css_per_px = page.eval_on_selector(
        "#stage", "c => { const r = c.getBoundingClientRect(); return [r.left, r.top, r.width / c.width]; }")
    x0, y0, x1, y1 = (v * css_per_px for v in box)
    page.mouse.move(left + x0, top + y0)
    page.mouse.down()
    for k in range(1, 9):  # a real drag: several moves
        page.mouse.move(left + x0 + (x1 - x0) * k / 8, top + y0 + (y1 - y0) * k / 8)
    page.mouse.up()


def go_to_frame(page: Any, thumb_frame: int, steps: int) -> int:
    """Click a strip thumbnail, then the ▶ button `steps` times; returns the frame shown."""
    page.click(f"#strip .thumb[data-frame='{thumb_frame}']")
    page.wait_for_selector(f"#frame-badge:text-is('frame {thumb_frame}')")
    frame = thumb_frame
    for _ in range(steps):
        page.click("#next")
        frame += 1
        page.wait_for_selector(f"#frame-badge:text-is('frame {frame}')")
    return frame


def canvas_pixels(page: Any) -> dict[str, Any]:
    """Read back the WebGL canvas (preserveDrawingBuffer) through a 2D canvas: drawn pixels, pixels in
    each region's highlight hue, and a checksum to tell two views apart."""
    return page.eval_on_selector("#view3d", """c => {
        const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
        const x = t.getContext('2d'); x.drawImage(c, 0, 0);
        const d = x.getImageData(0, 0, t.width, t.height).data;
        let drawn = 0, red = 0, blue = 0, sum = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] === 0) continue;
          drawn++; sum = (sum * 31 + d[i] * 7 + d[i + 1] * 3 + d[i + 2]) >>> 0;
          if (d[i] > 190 && d[i + 1] < 140 && d[i + 2] < 160) red++;
          if (d[i + 2] > 190 && d[i] < 140) blue++;
        }
        return {drawn, total: t.width * t.height, red, blue, sum, w: t.width, h: t.height};
    }""")


def settled_canvas(page: Any, frames: int = 10, timeout_s: float = 20.0) -> dict[str, Any]:
    """The 3D view once it holds still: the same pixels over `frames` consecutive animation frames
    (a view that keeps moving, e.g. still auto-rotating, fails here)."""
    deadline = time.monotonic() + timeout_s
    last, same = canvas_pixels(page), 0
    while same < frames:
        assert time.monotonic() < deadline, f"the 3D view did not hold still within {timeout_s} s"
        next_frame(page)
        now = canvas_pixels(page)
        same = same + 1 if now["sum"] == last["sum"] else 0
        last = now
    return last


def record_form_fields(page: Any) -> None:
    """Keep what the next FormData the page sends holds: text fields as text, files as
    {name, type, base64} (the browser does not expose a multipart body with files to Playwright).
    Read it with `sent_form`, which waits for it: the wrapper records the form only after it has
    read the files' bytes, which is after `page.click` returns."""
    page.evaluate("""() => {
        window.__sent = null;  // the next form, not one recorded before
        if (window.__realFetch) return;  // wrap once: a second wrapper would record the form twice
        const real = window.__realFetch = window.fetch;
        const b64 = async (blob) => {
            const bytes = new Uint8Array(await blob.arrayBuffer());
            let s = '';
            for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
            return btoa(s);
        };
        window.fetch = async (url, init) => {
            if (init && init.body instanceof FormData) {
                const sent = {};
                for (const [k, v] of init.body.entries()) {
                    sent[k] = typeof v === 'string' ? v
                        : { name: v.name, type: v.type, data: v.size < (1 << 20) ? await b64(v) : null };
                }
                window.__sent = sent;
            }
            return real(url, init);
        };
    }""")


def sent_form(page: Any) -> dict[str, Any]:
    """The form `record_form_fields` kept, once the page has sent it."""
    return wait_in_page(page, "window.__sent", "the page to send its form")


def next_frame(page: Any) -> None:
    """Let the page run until it has painted twice (its pending tasks and promises get to run)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def wait_in_page(page: Any, expression: str, what: str, timeout_s: float = 30.0) -> Any:
    """Poll a page expression once per painted frame until it is truthy; its value. (Playwright's
    wait_for_function would do as well; this one fails with `what` in the message.)"""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(expression)):
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what} ({expression})"
        next_frame(page)
    return value


def drag_lasso(page: Any, points: list[tuple[float, float]]) -> None:
    """Draw a closed freehand outline (frame pixels) with the Freehand tool."""
    page.click(".tool[data-tool='lasso']")
    left, top, css_per_px = page.eval_on_selector(
        "#stage", "c => { const r = c.getBoundingClientRect(); return [r.left, r.top, r.width / c.width]; }")
    page.mouse.move(left + points[0][0] * css_per_px, top + points[0][1] * css_per_px)
    page.mouse.down()
    for x, y in points[1:] + points[:1]:
        page.mouse.move(left + x * css_per_px, top + y * css_per_px, steps=6)
    page.mouse.up()
    page.click(".tool[data-tool='box']")


def test_ask_about_two_boxes_on_two_frames_then_turn_the_scene(browser: Any, service: str) -> None:
    from model.geometry.scene_export import unpack_scene
    from service.media import probe_video

    clip = find_fixture(BOTTLE_NAME)
    info = probe_video(clip)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log = PageLog(page)
    page.goto(service + "/")
    assert page.title().startswith("SR-3D")

    page.set_input_files("#file", str(clip))
    page.wait_for_selector(f"#strip .thumb[data-frame='{info.frame_count - 1}']")  # the strip is complete
    # The browser's frame numbering is the server's: same frame rate, same frame count.
    assert f"{info.fps:.2f} fps" in page.inner_text("#frame-label")
    assert page.get_attribute("#scrubber", "max") == str(info.frame_count - 1)
    thumbs = [int(t) for t in page.eval_on_selector_all("#strip .thumb", "ts => ts.map(t => t.dataset.frame)")]
    assert thumbs[0] == 0 and thumbs == sorted(thumbs) and len(thumbs) >= 8

    boxes = [(40.0, 110.0, 200.0, 340.0), (420.0, 110.0, 590.0, 340.0)]
    frame_a = go_to_frame(page, thumbs[1], steps=2)
    drag_box(page, boxes[0])
    frame_b = go_to_frame(page, thumbs[5], steps=0)
    drag_box(page, boxes[1])
    assert frame_a != frame_b
    assert page.locator("#regions .region").count() == 2
    shot(page, "1-regions.png")

    # Clicking a region inserts its reference at the caret.
    page.fill("#question", "How far is ")
    page.click("#regions .region[data-region='0'] .tag")
    page.keyboard.type(" from ")
    page.click("#regions .region[data-region='1'] .tag")
    page.keyboard.type("?")
    assert page.input_value("#question") == "How far is <region0> from <region1>?"
    page.click(".options summary")
    page.fill("#opt-max-tokens", "48")

    record_form_fields(page)
    page.click("#ask")
    fields = sent_form(page)
    assert fields["question"] == "How far is <region0> from <region1>?"
    assert fields["video"]["name"] == clip.name
    regions = json.loads(fields["regions"])
    assert [r["frame"] for r in regions] == [frame_a, frame_b]
    for sent, drawn in zip(regions, boxes):  # frame pixels, back from screen pixels
        assert all(abs(a - b) <= 2 for a, b in zip(sent["box"], drawn)), (sent, drawn)

    page.wait_for_selector("#answer:not([data-tokens='0'])", timeout=180_000)
    shot(page, "2-streaming.png")
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    answer_el = page.locator("#answer")
    assert answer_el.get_attribute("data-status") == "done"
    job_id = answer_el.get_attribute("data-job-id")
    view = httpx.get(f"{service}/v1/spatial-qa/{job_id}", timeout=10).json()
    assert view["status"] == "done"
    assert answer_el.text_content() == view["answer"] and view["answer"]
    assert int(answer_el.get_attribute("data-tokens")) >= 1
    # The demo serves the tiny random-weight checkpoint: the page must say the text is not an answer.
    assert page.locator("#demo-note").is_visible()
    for stage in ("queued", "decode", "pointmaps", "encode", "generate"):
        assert "done" in page.get_attribute(f"#stages li[data-stage='{stage}']", "class"), stage

    # The server marked each region on the frame the page showed: the scene's region points come
    # from the cameras of exactly those original frames.
    scene = unpack_scene(httpx.get(f"{service}/v1/spatial-qa/{job_id}/scene", timeout=10).content)
    for k, frame in enumerate((frame_a, frame_b)):
        cams = set(scene.camera[scene.region == k + 1].tolist())
        assert {int(scene.frame_indices[c]) for c in cams} == {frame}

    # The 3D view: the scene's points are drawn, both regions' highlights are visible.
    page.wait_for_selector("#view3d[data-points]", timeout=60_000)
    assert page.get_attribute("#view3d", "data-points") == str(len(scene.positions))
    before = canvas_pixels(page)
    assert before["drawn"] > 0.02 * before["total"], before
    assert before["red"] > 50 and before["blue"] > 50, before
    shot(page, "3-answer-and-scene.png", full_page=True)

    # Orbit and zoom with the mouse: the view changes, then holds still (auto-rotation stopped).
    page.locator("#view3d").scroll_into_view_if_needed()
    box = page.locator("#view3d").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 160, cy + 40, steps=8)
    page.mouse.up()
    page.mouse.wheel(0, -300)
    turned = settled_canvas(page)
    assert turned["sum"] != before["sum"] and turned["drawn"] > 0.02 * turned["total"]
    shot(page, "4-turned.png", full_page=True)
    assert log.unexpected() == []
    context.close()


def test_page_asks_for_a_key_keeps_it_for_the_tab_and_cancels(browser: Any, redis_url: str, tmp_path: Path) -> None:
    """API keys on (a gateway without a worker, so the job stays queued): the page asks for a key,
    submits with it, shows the queued stage, and Cancel ends the job through DELETE. Then the same
    with an image."""
    import av

    from tests.conftest import run_gateway

    image = tmp_path / "frame.png"
    with av.open(str(find_fixture(BOTTLE_NAME))) as container:
        next(container.decode(video=0)).to_image().save(image)

    with run_gateway(redis_url, api_keys=["k-web"]) as base:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        log = PageLog(page)
        page.goto(base + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "k-web")
        page.click("#key-dialog button")
        page.wait_for_selector("#key-dialog", state="hidden")
        # the dialog's `close` event is a queued task: wait for the key it stores
        wait_in_page(page, "sessionStorage.getItem('sr3d.apiKey') === 'k-web'", "the key in sessionStorage")
        assert page.evaluate("localStorage.length") == 0

        page.set_input_files("#file", str(find_fixture(BOTTLE_NAME)))
        page.wait_for_selector("#strip .thumb")
        square = [(250.0, 60.0), (330.0, 60.0), (330.0, 300.0), (250.0, 300.0)]  # 80 x 240 px
        drag_lasso(page, square)
        page.fill("#question", "What is <region0>?")
        record_form_fields(page)
        with page.expect_request(lambda r: r.url.endswith("/v1/spatial-qa") and r.method == "POST") as req:
            page.click("#ask")
        assert req.value.headers["authorization"] == "Bearer k-web"
        # A freehand region is a PNG part named in `regions`, frame-sized, non-zero inside the outline.
        sent = sent_form(page)
        assert json.loads(sent["regions"]) == [{"frame": 0, "mask": "m0"}]
        assert sent["m0"]["type"] == "image/png" and sent["m0"]["name"] == "m0.png"
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["m0"]["data"]))).convert("RGBA"))
        assert mask.shape[:2] == (360, 640)
        inside = (mask[..., :3] != 0).any(axis=-1) & (mask[..., 3] != 0)  # the API's rule (service/media.py)
        assert abs(int(inside.sum()) - 80 * 240) < 0.05 * 80 * 240
        assert inside[180, 290] and not inside[180, 200] and not inside[30, 290]
        page.wait_for_selector("#stages li[data-stage='queued'].active")
        page.wait_for_selector("#cancel:not([hidden])")
        page.click("#cancel")
        page.wait_for_selector("#answer[data-status='cancelled']")
        job_id = page.get_attribute("#answer", "data-job-id")
        view = httpx.get(f"{base}/v1/spatial-qa/{job_id}", headers={"X-API-Key": "k-web"}).json()
        assert view["status"] == "cancelled"
        shot(page, "5-cancelled.png")

        # An image instead of a video: no frame strip, regions on frame 0, sent as the `image` part.
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#scrub", state="hidden")
        drag_box(page, (10.0, 10.0, 120.0, 90.0))
        page.fill("#question", "What is <region0>?")
        record_form_fields(page)
        page.click("#ask")
        page.wait_for_selector("#stages li[data-stage='queued'].active")
        sent = sent_form(page)
        assert sent["image"]["name"] == "frame.png" and "video" not in sent
        assert json.loads(sent["regions"]) == [{"frame": 0, "box": [10, 10, 120, 90]}]
        page.click("#cancel")
        page.wait_for_selector("#answer[data-status='cancelled']")
        assert log.unexpected() == []
        context.close()


def test_a_dropped_stream_is_resumed_with_last_event_id(browser: Any, service: str) -> None:
    """The submit response's body breaks off right after the first token (a network error, as a
    flaky link or a proxy would cause): the page must resume by itself from the last event it
    received and end with the API's answer."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log = PageLog(page)
    page.goto(service + "/")
    # Cut the submit stream inside the page: Playwright cannot re-send a multipart body with files.
    page.evaluate(r"""() => {
        const real = window.fetch;
        window.fetch = async (url, init) => {
            const res = await real(url, init);
            if (!(init && init.method === 'POST')) return res;
            const reader = res.body.getReader(), dec = new TextDecoder(), enc = new TextEncoder();
            let seen = '', cut = false;
            const body = new ReadableStream({ async pull(ctrl) {
                if (cut) { reader.cancel(); ctrl.error(new TypeError('network error')); return; }
                const { value, done } = await reader.read();
                if (done) { ctrl.close(); return; }
                const start = seen.length;
                seen += dec.decode(value, { stream: true }).replace(/\r\n/g, '\n');
                const tok = seen.indexOf('event: token'), end = tok < 0 ? -1 : seen.indexOf('\n\n', tok);
                if (end < 0) { ctrl.enqueue(enc.encode(seen.slice(start))); return; }
                seen = seen.slice(0, end + 2);  // the first token event, then the line goes dead
                ctrl.enqueue(enc.encode(seen.slice(start)));
                cut = true;
                window.__delivered = seen;
            } });
            return new Response(body, { status: res.status, headers: res.headers });
        };
    }""")
    page.set_input_files("#file", str(find_fixture(BOTTLE_NAME)))
    page.wait_for_selector("#strip .thumb")
    drag_lasso(page, [(250.0, 60.0), (330.0, 80.0), (320.0, 300.0), (255.0, 290.0)])  # the worker decodes this PNG
    page.fill("#question", "What is <region0>?")
    page.click(".options summary")
    page.fill("#opt-max-tokens", "32")
    with page.expect_request("**/events", timeout=200_000) as resumed:
        page.click("#ask")
    delivered = page.evaluate("window.__delivered")
    last_id = [line[4:] for line in delivered.split("\n") if line.startswith("id: ")][-1]
    assert resumed.value.headers["last-event-id"] == last_id
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    job_id = page.get_attribute("#answer", "data-job-id")
    view = httpx.get(f"{service}/v1/spatial-qa/{job_id}", timeout=10).json()
    assert page.get_attribute("#answer", "data-status") == "done"
    assert page.locator("#answer").text_content() == view["answer"]
    shot(page, "6-resumed.png")
    assert log.unexpected() == []
    context.close()
