"""A PNG of a registered point cloud, seen from above and from the side, with the cameras drawn, so a
person can judge a registration at a glance (Pillow only: no plotting dependency at runtime).

Axes are the canonical frame's (OpenCV: x right, y down, z forward of camera 0). "Above" looks down
the gravity-ish -y axis of camera 0 (x to the right, z up the page); "side" looks from +x (z to the
right, -y up the page). Camera 0 is red, the others blue, joined in frame order.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_PANEL = 480
_MARGIN = 24
_TITLE = 22
# (name, horizontal axis, vertical axis (+ = up the page), depth axis for painter's order: larger drawn first)
_VIEWS = (("top (x right, z up)", (0, 1.0), (2, 1.0), (1, 1.0)), ("side (z right, -y up)", (2, 1.0), (1, -1.0), (0, -1.0)))


def _project(p: np.ndarray, axis: tuple[int, float]) -> np.ndarray:
    return p[..., axis[0]] * axis[1]


def render_preview(points: np.ndarray, colors: np.ndarray, valid: np.ndarray, poses: np.ndarray, path: str,
                   max_points: int = 150_000, seed: int = 0) -> None:
    """points [F,H,W,3] canonical frame, colors uint8 [F,H,W,3], valid [F,H,W], poses [F,4,4] c2w."""
    idx = np.flatnonzero(valid.reshape(-1))
    if len(idx) > max_points:
        idx = np.random.default_rng(seed).choice(idx, size=max_points, replace=False)
    pts = points.reshape(-1, 3)[idx].astype(np.float64)
    rgb = colors.reshape(-1, 3)[idx]
    centres = poses[:, :3, 3].astype(np.float64)
    forward = poses[:, :3, 2].astype(np.float64)  # camera z axis in the canonical frame
    canvas = Image.new("RGB", (2 * _PANEL + 3 * _MARGIN, _PANEL + 2 * _MARGIN + _TITLE), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (title, hax, vax, dax) in enumerate(_VIEWS):
        ox, oy = _MARGIN + k * (_PANEL + _MARGIN), _MARGIN + _TITLE
        draw.text((ox, _MARGIN // 2), title, fill=(0, 0, 0))
        draw.rectangle([ox, oy, ox + _PANEL - 1, oy + _PANEL - 1], outline=(180, 180, 180))
        u_all = np.concatenate([_project(pts, hax), _project(centres, hax)])
        v_all = np.concatenate([_project(pts, vax), _project(centres, vax)])
        # Robust extent (outliers would shrink the scene to a dot), always including the cameras.
        lo = np.array([min(np.percentile(u_all, 1) if len(pts) else 0, _project(centres, hax).min()),
                       min(np.percentile(v_all, 1) if len(pts) else 0, _project(centres, vax).min())])
        hi = np.array([max(np.percentile(u_all, 99) if len(pts) else 1, _project(centres, hax).max()),
                       max(np.percentile(v_all, 99) if len(pts) else 1, _project(centres, vax).max())])
        span = float(max(hi - lo)) * 1.1 + 1e-9
        mid = (lo + hi) / 2

        def to_px(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = ox + (u - mid[0]) / span * (_PANEL - 1) + _PANEL / 2
            y = oy + _PANEL / 2 - (v - mid[1]) / span * (_PANEL - 1)
            return x, y

        if len(pts):
            x, y = to_px(_project(pts, hax), _project(pts, vax))
            order = np.argsort(-_project(pts, dax))  # far first, near last (painter's order)
            xi, yi = x[order].astype(np.int64), y[order].astype(np.int64)
            ok = (xi >= ox) & (xi < ox + _PANEL) & (yi >= oy) & (yi < oy + _PANEL)
            arr = np.asarray(canvas).copy()
            arr[yi[ok], xi[ok]] = rgb[order][ok]
            canvas.paste(Image.fromarray(arr))
            draw = ImageDraw.Draw(canvas)
        cx, cy = to_px(_project(centres, hax), _project(centres, vax))
        fx, fy = to_px(_project(centres + forward * span * 0.06, hax), _project(centres + forward * span * 0.06, vax))
        draw.line(list(zip(cx.tolist(), cy.tolist())), fill=(0, 90, 255), width=1)  # trajectory in frame order
        for i in reversed(range(len(centres))):  # camera 0 last: never hidden by another
            colour = (230, 0, 0) if i == 0 else (0, 90, 255)
            draw.line([(cx[i], cy[i]), (fx[i], fy[i])], fill=colour, width=2)
            draw.ellipse([cx[i] - 4, cy[i] - 4, cx[i] + 4, cy[i] + 4], outline=colour, width=2)
            draw.text((cx[i] + 5, cy[i] + 3), str(i), fill=colour)
    canvas.save(path, format="PNG")
