"""The `grounded` answer mode's one fixed template: the measured facts, put before the question.

Template (one line each; lengths as in `wording.length`: "1.23 m" / "45.3 cm" when metric, otherwise
"0.83 relative units (no metric scale)"):

    Measured from the 3D point maps (scale: <metric|relative>; source: <source>; up: <method>):
    Region [k]: width <w>, height <h>, depth <d>; <points_used> points from frame(s) <f, ...>.
    Region [k]: not measurable (<reason>).
    Region [a] to Region [b]: centre distance <c>, closest points <p>, horizontal <h>, vertical <v>;
    Region [b] is <left of|right of|level with> ..., at <k> o'clock from Region [a].
    Region [a] to Region [b]: not measurable (<reason>).

Direction words describe B as seen from A in the reference view (see `model/measure/pairs.py`).
"""
from __future__ import annotations

from model.measure.types import Measurements
from model.measure.wording import length, region_name

_SIDE = {"left": "to the left of", "right": "to the right of", "aligned": "level left-to-right with",
         "above": "above", "below": "below", "level": "at the same height as",
         "in front of": "in front of", "behind": "behind", "same depth": "at the same depth as"}


def grounding_text(m: Measurements) -> str:
    lines = [f"Measured from the 3D point maps (scale: {m.scale}; source: {m.source}; up: {m.up.method}):"]
    for r in m.regions:
        name = region_name(r.region)
        if not r.available:
            lines.append(f"{name}: not measurable ({r.reason}).")
            continue
        frames = ", ".join(str(f) for f in r.frames)
        lines.append(f"{name}: width {length(m, r.width or 0)}, height {length(m, r.height or 0)}, "
                     f"depth {length(m, r.depth or 0)}; {r.points_used} points from frame(s) {frames}.")
    for p in m.pairs:
        na, nb = region_name(p.a), region_name(p.b)
        if not p.available:
            lines.append(f"{na} to {nb}: not measurable ({p.reason}).")
            continue
        d = p.direction or {}
        words = [_SIDE[d[k]] for k in ("left_right", "above_below", "front_behind") if k in d]
        sides = ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)
        lines.append(f"{na} to {nb}: centre distance {length(m, p.center_distance or 0)}, closest points "
                     f"{length(m, p.closest_distance or 0)}, horizontal {length(m, p.horizontal_distance or 0)}, "
                     f"vertical {length(m, p.vertical_distance or 0)}; {nb} is {sides} {na}, at "
                     f"{d.get('clock')} o'clock from {na}.")
    return "\n".join(lines)
