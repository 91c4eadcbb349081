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
PHONE = {"width": 390, "height": 844}  # a common phone's CSS viewport


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
    from service.local_stack import serve_stack

    with serve_stack(tmp_path_factory.mktemp("serve-web"), SERVE_ENV) as (_, url):
        yield url


class PageLog:
    """Console errors and uncaught exceptions of a page (a CSP violation shows up here)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def unexpected(self) -> list[str]:
        # The key probe (GET /v1/models) is answered 401 when keys are on and none or a wrong one was
        # sent, by design; anything else (a 404 included) is a fault.
        return [e for e in self.errors if not ("Failed to load resource" in e and "401" in e)]


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
    from service.media.probe import probe_video

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
        assert page.locator("#key-error").is_hidden()  # asked, not yet refused
        # A wrong key: the page says it was rejected and asks again (it does not keep it).
        page.fill("#key-input", "not-the-key")
        page.click("#key-dialog button")
        page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
        assert "rejected" in page.inner_text("#key-error").lower()
        assert page.input_value("#key-input") == ""
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
        inside = (mask[..., :3] != 0).any(axis=-1) & (mask[..., 3] != 0)  # the API's rule (service/media/masks.py)
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
    resumes: list[Any] = []
    page.on("request", lambda r: resumes.append(r) if r.url.endswith("/events") else None)
    page.click("#ask")
    # First the cut (the first token reached the page), else whatever ended the ask without one.
    wait_in_page(page, "window.__delivered || document.querySelector('#answer[data-status], #answer[data-notice]')",
                 "the first token to reach the page", timeout_s=180)
    delivered = page.evaluate("window.__delivered")
    assert delivered, ("the ask ended before any token event: "
                       f"{page.get_attribute('#answer', 'data-status')!r} {page.text_content('#answer')!r}")
    deadline = time.monotonic() + 30  # the page's first retry waits 0.5 s
    while not resumes:
        assert time.monotonic() < deadline, "the page did not resume the dropped stream within 30 s"
        next_frame(page)  # lets Playwright deliver the page's request events
    last_id = [line[4:] for line in delivered.split("\n") if line.startswith("id: ")][-1]
    assert resumes[0].headers.get("last-event-id") == last_id
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    job_id = page.get_attribute("#answer", "data-job-id")
    view = httpx.get(f"{service}/v1/spatial-qa/{job_id}", timeout=10).json()
    assert page.get_attribute("#answer", "data-status") == "done"
    assert page.locator("#answer").text_content() == view["answer"]
    shot(page, "6-resumed.png")
    assert log.unexpected() == []
    context.close()


def layout_faults(page: Any) -> dict[str, Any]:
    """What sticks out at the current viewport: the document's scroll width against its client width,
    and every rendered element whose visible box (clipped by its scrolling/clipping ancestors) lies
    past the viewport's left or right edge, or whose step heading runs past its card."""
    return page.evaluate("""() => {
        const root = document.documentElement, vw = root.clientWidth;
        const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
            + (el.classList.length ? '.' + [...el.classList].join('.') : '');
        const outside = [];
        for (const el of document.querySelectorAll('body *')) {
            const r = el.getBoundingClientRect();
            if (r.width === 0 && r.height === 0) continue;  // not rendered
            let left = r.left, right = r.right;
            for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
                if (getComputedStyle(a).overflowX === 'visible') continue;
                const c = a.getBoundingClientRect();
                left = Math.max(left, c.left); right = Math.min(right, c.right);
            }
            if (right > left && (right > vw + 0.5 || left < -0.5)) outside.push([name(el), left, right]);
        }
        const headings = [...document.querySelectorAll('.card h2')].map(h => {
            const r = h.getBoundingClientRect(), c = h.closest('.card').getBoundingClientRect();
            return {text: h.textContent, top: r.top, inside: r.left >= c.left - 0.5 && r.right <= c.right + 0.5,
                    fits: h.scrollWidth <= h.clientWidth + 1};
        });
        return {scrollWidth: root.scrollWidth, clientWidth: vw, outside, headings};
    }""")


def assert_fits_phone(page: Any, when: str) -> None:
    faults = layout_faults(page)
    assert faults["scrollWidth"] <= faults["clientWidth"], (when, faults)
    assert faults["clientWidth"] == PHONE["width"], (when, faults)
    assert faults["outside"] == [], (when, faults["outside"])
    heads = faults["headings"]
    assert all(h["inside"] and h["fits"] for h in heads), (when, heads)
    # The four steps top to bottom in their own order (not column by column).
    order = [h["text"].split("·")[0].strip() for h in sorted(heads, key=lambda h: h["top"])]
    assert order == ["1", "2", "3", "4"], (when, order)
    # "SR-3D" on one line: every line box of the title's text starts at the same height.
    tops = page.evaluate("""() => {
        const brand = document.querySelector('.brand');
        const text = [...brand.childNodes].find(n => n.nodeType === 3 && n.textContent.includes('SR-3D'));
        const range = document.createRange(); range.selectNodeContents(text);
        return [...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top));
    }""")
    assert tops and len(set(tops)) == 1, (when, tops)


def test_phone_viewport_fits_and_keeps_the_steps_in_order(browser: Any, service: str) -> None:
    """At 390 x 844 CSS px (a phone, touch, device pixel ratio 3): nothing runs past the screen's
    width, the steps read 1 2 3 4 downwards, the "Choose a file" button is whole and tappable, and
    the title stays on one line; the same after a clip is loaded, two regions drawn and answered."""
    context = browser.new_context(viewport=PHONE, device_scale_factor=3, is_mobile=True, has_touch=True)
    page = context.new_page()
    log = PageLog(page)
    page.goto(service + "/")
    page.wait_for_selector(".drop-hint label.button")
    assert_fits_phone(page, "empty page")
    button = page.locator(".drop-hint label.button")
    button.scroll_into_view_if_needed()
    whole = page.evaluate("""() => {
        const b = document.querySelector('.drop-hint label.button').getBoundingClientRect();
        const d = document.getElementById('drop').getBoundingClientRect();
        const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
        return {inDrop: b.left >= d.left && b.right <= d.right && b.top >= d.top && b.bottom <= d.bottom,
                inView: b.left >= 0 && b.right <= innerWidth && b.top >= 0 && b.bottom <= innerHeight,
                hit: !!hit && !!hit.closest('.drop-hint label.button'), height: b.height};
    }""")
    assert whole["inDrop"] and whole["inView"] and whole["hit"] and whole["height"] > 20, whole
    shot(page, "7-phone-empty.png", full_page=True)

    page.set_input_files("#file", str(find_fixture(BOTTLE_NAME)))
    page.wait_for_selector("#strip .thumb")
    page.wait_for_selector("#drop:not(.empty)")
    page.locator("#stage").scroll_into_view_if_needed()
    drag_box(page, (40.0, 110.0, 200.0, 340.0))
    drag_box(page, (420.0, 110.0, 590.0, 340.0))
    assert page.locator("#regions .region").count() == 2
    page.fill("#question", "How far is <region0> from <region1>?")
    page.click(".options summary")
    page.fill("#opt-max-tokens", "8")
    assert_fits_phone(page, "clip loaded, regions drawn, options open")
    page.click("#ask")
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    assert page.get_attribute("#answer", "data-status") == "done"
    page.wait_for_selector("#view3d[data-points]", timeout=60_000)
    assert_fits_phone(page, "answered, scene shown")
    page.evaluate("scrollTo(0, 0)")  # the sticky header at the top of the full-page shot, not mid-page
    shot(page, "8-phone-answered.png", full_page=True)
    assert log.unexpected() == []
    context.close()


def test_page_without_a_file_then_row_clicks_arrow_keys_and_an_image(browser: Any, service: str, tmp_path: Path) -> None:
    """Ctrl+Enter before a file says what is missing (not a JavaScript error), and a loaded file
    clears it; five quick → presses move exactly five frames; a click anywhere on a region row but
    its label inserts the region; an image's scene is counted as "1 camera". No console error on
    the way (no 404 from the key probe either)."""
    import av

    image = tmp_path / "frame.png"
    with av.open(str(find_fixture(BOTTLE_NAME))) as container:
        next(container.decode(video=0)).to_image().save(image)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log = PageLog(page)
    page.goto(service + "/")

    page.fill("#question", "What is this?")
    page.press("#question", "Control+Enter")
    page.wait_for_selector("#answer[data-notice='media']")
    assert page.inner_text("#answer").strip() == "Choose a video or image first."
    page.set_input_files("#file", str(find_fixture(BOTTLE_NAME)))
    page.wait_for_selector("#answer:not([data-notice])")
    assert page.inner_text("#answer").strip() == ""

    # Five quick presses: each moves one frame, whether or not the previous seek has landed.
    page.wait_for_selector("#frame-badge:text-is('frame 0')")
    page.wait_for_selector("#drop:not([data-seeking])")
    page.focus("#stage")
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    page.wait_for_selector("#drop:not([data-seeking])")
    for _ in range(3):  # and it stays there
        next_frame(page)
    assert page.inner_text("#frame-badge") == "frame 5"
    assert page.input_value("#scrubber") == "5"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_selector("#drop:not([data-seeking])")
    assert page.inner_text("#frame-badge") == "frame 3"

    drag_box(page, (40.0, 110.0, 200.0, 340.0))
    drag_box(page, (420.0, 110.0, 590.0, 340.0))
    page.fill("#question", "How far is ")
    page.locator("#question").evaluate("q => q.setSelectionRange(q.value.length, q.value.length)")
    for k, then in ((0, " from "), (1, "?")):
        row = f"#regions .region[data-region='{k}']"
        # The row's middle is not its label field: that is where a person clicks.
        hit = page.eval_on_selector(row, """r => { const b = r.getBoundingClientRect();
            return document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2).tagName; }""")
        assert hit != "INPUT", hit
        page.click(row)  # Playwright clicks the middle of the row
        page.keyboard.type(then)
    assert page.input_value("#question") == "How far is <region0> from <region1>?"
    page.click("#regions .region[data-region='1'] input")  # editing a label inserts nothing
    page.keyboard.press("End")
    page.keyboard.type(" left")
    assert page.input_value("#question") == "How far is <region0> from <region1>?"
    assert page.input_value("#regions .region[data-region='1'] input") == "object 1 left"

    # An image: one camera, said in the singular.
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#scrub", state="hidden")
    drag_box(page, (10.0, 10.0, 120.0, 90.0))
    page.fill("#question", "What is <region0>?")
    page.click(".options summary")
    page.fill("#opt-max-tokens", "4")
    page.click("#ask")
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    assert page.get_attribute("#answer", "data-status") == "done"
    page.wait_for_selector("#view3d[data-points]", timeout=60_000)
    legend = page.inner_text("#legend")
    assert "· 1 camera" in legend and "1 cameras" not in legend, legend
    assert log.unexpected() == []
    context.close()


def test_docs_render_offline_from_this_server(browser: Any, service: str) -> None:
    """/docs is Swagger UI from this server's own files (no CDN): every request it makes goes to the
    service's origin and succeeds, the CSP lets it render the API's title and routes, and no
    console error (a CSP violation included) is logged."""
    from urllib.parse import urlsplit

    html = httpx.get(f"{service}/docs", timeout=10)  # Swagger UI 5, from the fastapi-offline package
    assert html.status_code == 200 and "Content-Security-Policy" in html.headers
    assert "//" not in html.text.replace("/openapi.json", ""), "the docs page names another host"
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log = PageLog(page)
    origin = urlsplit(service).netloc
    seen: list[tuple[str, int]] = []
    page.on("requestfinished", lambda r: seen.append((r.url, r.response().status if r.response() else 0)))
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(service + "/docs")
    try:
        page.wait_for_selector(".swagger-ui .info .title:has-text('SR-3D spatial QA')")
    except Exception as e:  # say why it did not render (a CSP violation shows up in the log)
        raise AssertionError(f"Swagger UI did not render: {log.errors} {failed} {seen}") from e
    page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/v1/spatial-qa']")
    for _ in range(3):
        next_frame(page)
    assert failed == [], failed
    hosts = {urlsplit(u).netloc for u, _ in seen if not u.startswith("data:")}
    assert hosts == {origin}, seen
    assert all(status == 200 for _, status in seen), seen
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u, _ in seen), seen
    assert log.unexpected() == []
    shot(page, "9-docs.png")
    context.close()


# ---- measurements: the panel under the answer and the boxes / distance segment in the 3D view ----------
# Ground truth made here, as tests/test_measured_service.py does: a flat wall 2 m in front of a pinhole
# camera (f = 100 px), sent as an exact RGB-D scene through the page's own .npz input. A box's pixels
# span px * 2 m / 100 px on the wall, so the boxes' sizes and centre distance are known in closed form.
WALL_W, WALL_H, WALL_F, WALL_DEPTH_M = 160, 120, 100.0, 2.0
WALL_BOXES = [(20.0, 40.0, 60.0, 80.0), (100.0, 30.0, 140.0, 90.0)]
WALL_CENTRE_DISTANCE_M = 80 * WALL_DEPTH_M / WALL_F  # centres 80 px apart on one row: 1.6 m
WALL_A_WIDTH_M = 40 * WALL_DEPTH_M / WALL_F  # 0.8 m


def wall_files(tmp_path: Path) -> tuple[Path, Path]:
    image, scene = tmp_path / "wall.png", tmp_path / "wall.npz"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (WALL_H, WALL_W, 3), dtype=np.uint8)).save(image)
    K = np.array([[WALL_F, 0, WALL_W / 2], [0, WALL_F, WALL_H / 2], [0, 0, 1]], np.float32)
    np.savez(scene, depth=np.full((1, WALL_H, WALL_W), WALL_DEPTH_M, np.float32), intrinsics=K,
             poses=np.eye(4, dtype=np.float32)[None])
    return image, scene


def page_length(value: float) -> str:
    """measure.js `formatLength` for metres: mm below 1 m, cm above."""
    return f"{value:.3f} m" if abs(value) < 1 else f"{value:.2f} m"


def colour_pixels(page: Any, colours: list[str]) -> list[int]:
    """Pixels of the 3D view that are exactly (±3 per channel) each colour. Region points never are:
    they mix in 18 % of the photo's colour and are shaded; the boxes' edges are drawn flat."""
    return page.eval_on_selector("#view3d", """(c, colours) => {
        const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
        const x = t.getContext('2d'); x.drawImage(c, 0, 0);
        const d = x.getImageData(0, 0, t.width, t.height).data;
        const want = colours.map(h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16)));
        const n = want.map(() => 0);
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] < 250) continue;
          want.forEach((w, k) => { if (Math.abs(d[i] - w[0]) <= 3 && Math.abs(d[i + 1] - w[1]) <= 3 && Math.abs(d[i + 2] - w[2]) <= 3) n[k]++; });
        }
        return n;
    }""", colours)


def test_measured_answer_shows_measurements_and_draws_boxes_and_the_distance(browser: Any, service: str,
                                                                              tmp_path: Path) -> None:
    """Image + RGB-D scene chosen in the page, "Answer from: measured": the panel under the answer
    states the sizes and the centre distance in metres (the API's numbers, and the closed-form truth),
    says they come from RGB-D depth; the 3D view draws both regions' boxes in their colours and the
    centre-to-centre segment labelled with the API's distance. Then without the scene: relative
    units, said so, and no metres."""
    image, npz = wall_files(tmp_path)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log = PageLog(page)
    page.goto(service + "/")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#drop:not(.empty)")
    for box in WALL_BOXES:
        drag_box(page, box)
    assert page.locator("#regions .region").count() == 2
    colours = page.eval_on_selector_all("#regions .region .swatch", "s => s.map(e => getComputedStyle(e).backgroundColor)")
    colours = ["#" + "".join(f"{int(v):02x}" for v in c[c.index("(") + 1:-1].split(",")[:3]) for c in colours]
    page.fill("#question", "How far is <region0> from <region1>?")
    page.click(".options summary")
    page.set_input_files("#opt-scene", str(npz))
    page.select_option("#opt-answer-mode", "measured")

    record_form_fields(page)
    page.click("#ask")
    fields = sent_form(page)
    assert json.loads(fields["options"])["answer_mode"] == "measured"
    assert fields["scene"]["name"] == "wall.npz"
    page.wait_for_selector("#answer[data-status]", timeout=180_000)
    assert page.get_attribute("#answer", "data-status") == "done"
    job_id = page.get_attribute("#answer", "data-job-id")
    view = httpx.get(f"{service}/v1/spatial-qa/{job_id}", timeout=10).json()
    assert view["answer_mode"] == "measured"
    m = view["measurements"]
    assert m["scale"] == "metric" and m["unit"] == "m"
    distance = m["pairs"][0]["center_distance"]
    assert distance["unit"] == "m" and abs(distance["value"] - WALL_CENTRE_DISTANCE_M) <= 0.05 * WALL_CENTRE_DISTANCE_M

    # The panel: the API's numbers with their unit, and where the scale came from.
    page.wait_for_selector("#measurements:not([hidden])")
    assert "measured from RGB-D depth" in page.inner_text("#measurements .m-source")
    centre = page.locator("#measurements .m-pair[data-pair='0-1'] .m-centre")
    assert float(centre.get_attribute("data-value")) == distance["value"]
    assert page_length(distance["value"]) in centre.inner_text() and centre.inner_text().endswith(" m apart")
    pair_text = page.inner_text("#measurements .m-pair[data-pair='0-1']")
    assert "closest points" in pair_text and "horizontal" in pair_text and "vertical" in pair_text
    assert "region1 from region0: right" in pair_text and "o'clock" in pair_text, pair_text
    size = page.locator("#measurements .m-region[data-region='0'] .m-size")
    width = m["regions"][0]["width"]["value"]
    assert float(size.get_attribute("data-width")) == width and abs(width - WALL_A_WIDTH_M) <= 0.05 * WALL_A_WIDTH_M
    assert size.inner_text().endswith(" m (w × h × d)"), size.inner_text()
    assert page.locator("#demo-note").is_hidden()  # no language model wrote this text
    for stage in ("encode", "generate"):  # and the stages say so
        assert "skipped" in page.get_attribute(f"#stages li[data-stage='{stage}']", "class"), stage

    # The 3D view: two boxes and one segment, labelled with the API's distance.
    page.wait_for_selector("#view3d[data-boxes='2'][data-segments='1']", timeout=60_000)
    label = page.locator("#view-labels .seg-label[data-pair='0-1']")
    assert label.inner_text() == page_length(distance["value"])
    assert float(label.get_attribute("data-value")) == distance["value"]
    # Hold the view still at its start pose (double-click resets, a click stops the turning) and
    # compare the same view with and without the overlay: the boxes' colours appear only with it.
    page.locator("#view3d").scroll_into_view_if_needed()
    page.dblclick("#view3d")
    page.click("#view3d")
    with_boxes = settled_canvas(page)
    drawn = colour_pixels(page, colours)
    label_box, canvas_box = label.bounding_box(), page.locator("#view3d").bounding_box()
    assert canvas_box["x"] <= label_box["x"] and label_box["x"] + label_box["width"] <= canvas_box["x"] + canvas_box["width"]
    assert canvas_box["y"] <= label_box["y"] and label_box["y"] + label_box["height"] <= canvas_box["y"] + canvas_box["height"]
    shot(page, "5-measured.png", full_page=True)
    page.uncheck("#view-measure")
    without = settled_canvas(page)
    bare = colour_pixels(page, colours)
    assert without["sum"] != with_boxes["sum"]
    assert label.is_hidden()
    assert all(d >= 100 and d > 4 * b for d, b in zip(drawn, bare)), (drawn, bare)
    page.check("#view-measure")

    # No RGB-D scene: the depth model's relative scale, and the page says so instead of metres.
    page.set_input_files("#opt-scene", [])
    page.click("#ask")
    page.wait_for_selector("#answer[data-status='done']:not(.streaming)", timeout=180_000)
    page.wait_for_selector("#measurements:not([hidden])")
    rel_id = page.get_attribute("#answer", "data-job-id")
    assert rel_id != job_id
    rel = httpx.get(f"{service}/v1/spatial-qa/{rel_id}", timeout=10).json()["measurements"]
    assert rel["scale"] == "relative"
    text = page.inner_text("#measurements")
    assert "no metric scale" in page.inner_text("#measurements .m-source")
    assert " m " not in text and not text.rstrip().endswith(" m"), text
    if any(r["available"] for r in rel["regions"]):
        assert "rel. units" in text, text
    shot(page, "6-relative.png", full_page=True)
    assert log.unexpected() == []
    context.close()
