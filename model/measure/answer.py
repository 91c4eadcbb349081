"""The `measured` answer mode: a small question-intent parser that writes the answer from the numbers.

Regions are referenced as <region0>, <region1>, ... (or "Region [K]"); the first one named is A, the
second B. Intents, tried in this order (keyword rules, case-insensitive; the phrasings are those of
SpatialRGPT-Bench's question templates, AnjieCheng/SpatialRGPT dataset_pipeline/osdsynth/processor/
prompt_template.py, and VSI-Bench's, vision-x-nyu/thinking-in-space):

1. VSI-Bench object size ("longest dimension", one region): the longest box side (VSI-Bench: the
   longest side of the object's oriented box), in centimetres when the question says so. VSI-Bench
   scores the first word as a number, so these answers start with it.
2. VSI-Bench absolute distance ("closest point", two regions): closest-point distance, number first.
3. Direction (two regions; "o'clock", "clock", "where will you find", "direction"): the clock position
   of B seen from A (SpatialRGPT-Bench `direction`; 12 = away from the viewer, 3 = right).
4. Distances (two regions; "distance", "how far", "apart", "how close", "gap"): "vertical..." ->
   vertical distance, "horizontal..." -> horizontal distance, else centre-to-centre distance
   (SpatialRGPT-Bench `vertical_distance_data`, `horizontal_distance_data`, `distance_data`).
5. Comparisons (two regions): left/right, above/below (over, under, higher, lower), in front/behind
   (closer, nearer, less distant, more forward / further, farther, more distant, more backward),
   tall/short, wide/thin (narrower), big/small (larger, less space). A question with "which" or "who"
   is a choice (the answer names the region first: SpatialRGPT's `*_choice`), otherwise a yes/no
   predicate about A relative to B (the answer starts with "Yes" or "No": `*_predicate`).
6. Sizes (one region): width ("wide", "horizontal size"), height ("tall", "vertical size"), depth
   ("deep", "thick"), or all three for "size", "dimensions", "how big", "how large".

Anything else, or a region that could not be measured, gets "I can't measure that: <why>".
Lengths carry units when the scale is metric and say "relative units (no metric scale)" otherwise.
"""
from __future__ import annotations

import re

from model.measure.types import Measurements, PairMeasurement, RegionMeasurement
from model.measure.wording import RELATIVE, length, region_name, volume

CANT = "I can't measure that: "
_REF = re.compile(r"<region(\d+)>|region\s*\[\s*(\d+)\s*\]", re.IGNORECASE)


def _refs(question: str) -> list[int]:
    out: list[int] = []
    for m in _REF.finditer(question):
        k = int(m.group(1) or m.group(2))
        if k not in out:
            out.append(k)
    return out


def _has(text: str, pattern: str) -> bool:
    return re.search(pattern, text) is not None


# Comparison words -> relation of A to B. Order matters: the nearer/front phrasings before the
# farther ones ("less distant" before "distant"), heights and widths before general size.
_RELATIONS: list[tuple[str, str]] = [
    (r"\bleft\b", "left"),
    (r"\bright\b", "right"),
    (r"in front|less distant|\bcloser\b|\bnearer\b|more forward|\bbefore\b", "front"),
    (r"\bbehind\b|more distant|\bfurther\b|\bfarther\b|at the back|more backward", "behind"),
    (r"\babove\b|\bover\b|\bhigher\b|\bon top\b", "above"),
    (r"\bbelow\b|\bunder(neath)?\b|\blower\b|\bbeneath\b", "below"),
    (r"\btaller\b|greater height|more height", "tall"),
    (r"\bshorter\b|lesser height|less height|not as tall", "short"),
    (r"\bwider\b|greater width|\bbroader\b|more width", "wide"),
    (r"\bthinner\b|lesser width|less width|\bnarrower\b", "thin"),
    (r"\bbigger\b|\blarger\b|greater size|more space", "big"),
    (r"\bsmaller\b|less space", "small"),
]
_PHRASE = {"left": "to the left of", "right": "to the right of", "front": "in front of", "behind": "behind",
           "above": "above", "below": "below", "tall": "taller than", "short": "shorter than",
           "wide": "wider than", "thin": "thinner than", "big": "bigger than", "small": "smaller than"}
_CHOICE = {"left": "is more to the left", "right": "is more to the right", "front": "is in front",
           "behind": "is behind", "above": "is above", "below": "is below", "tall": "is taller",
           "short": "is shorter", "wide": "is wider", "thin": "is thinner", "big": "is bigger", "small": "is smaller"}


def _holds(rel: str, p: PairMeasurement) -> bool:
    """Whether "A <rel> B" holds for pair p (B relative to A)."""
    r, u, f = p.offset_right or 0.0, p.offset_up or 0.0, p.offset_forward or 0.0
    return {"left": r > 0, "right": r < 0, "above": u < 0, "below": u > 0, "behind": f < 0, "front": f > 0,
            "big": bool(p.bigger), "small": not p.bigger, "tall": bool(p.taller), "short": not p.taller,
            "wide": bool(p.wider), "thin": not p.wider}[rel]


def _evidence(rel: str, m: Measurements, p: PairMeasurement, ra: RegionMeasurement, rb: RegionMeasurement) -> str:
    if rel in ("left", "right"):
        return f"their centres are {length(m, abs(p.offset_right or 0))} apart left to right"
    if rel in ("above", "below"):
        return f"their centres are {length(m, abs(p.offset_up or 0))} apart vertically"
    if rel in ("front", "behind"):
        return f"their centres are {length(m, abs(p.offset_forward or 0))} apart in depth from the viewer"
    if rel in ("tall", "short"):
        return f"heights {length(m, ra.height or 0)} and {length(m, rb.height or 0)}"
    if rel in ("wide", "thin"):
        return f"widths {length(m, ra.width or 0)} and {length(m, rb.width or 0)}"
    return f"box volumes {volume(m, ra.volume or 0)} and {volume(m, rb.volume or 0)}"


def _region(m: Measurements, k: int) -> tuple[RegionMeasurement | None, str | None]:
    r = m.region(k)
    if r is None:
        return None, f"the question names {region_name(k)}, but the request has {len(m.regions)} region(s)."
    if not r.available:
        return None, f"{region_name(k)} could not be measured ({r.reason})."
    return r, None


def _relative_note(m: Measurements) -> str:
    return "" if m.unit == "m" else f" Lengths are in {RELATIVE}: the depth source ({m.source}) gives no metric scale."


def answer_from_measurements(question: str, m: Measurements) -> str:
    q = question.lower()
    refs = _refs(question)
    if not refs:
        return CANT + "the question names no region (<region0>, <region1>, ...), so there is nothing to measure."
    regions = []
    for k in refs[:2]:
        r, why = _region(m, k)
        if why:
            return CANT + why
        regions.append(r)
    a = refs[0]
    ra = regions[0]
    two = len(refs) >= 2
    b = refs[1] if two else None
    rb = regions[1] if two else None
    na, nb = region_name(a), region_name(b) if b is not None else ""
    note = _relative_note(m)

    if _has(q, r"longest dimension|object size") and ra is not None and ra.longest is not None:
        if m.unit == "m" and _has(q, r"centimet|\bcm\b"):
            return f"{ra.longest * 100:.1f} cm is the longest dimension of {na}."
        return f"{length(m, ra.longest)} is the longest dimension of {na}.{note}"

    pair = m.pair(a, b) if two and b is not None else None
    if two and (pair is None or not pair.available):
        return CANT + (pair.reason if pair is not None and pair.reason else "the pair could not be measured.")

    if two and pair is not None and _has(q, r"closest point|nearest point"):
        d = pair.closest_distance or 0.0
        if m.unit == "m" and _has(q, r"centimet"):
            return f"{d * 100:.1f} cm between the closest points of {na} and {nb}."
        if m.unit == "m" and _has(q, r"\bmet(er|re)s?\b"):  # VSI-Bench asks "(in meters)": the number comes first
            return f"{d:.2f} m between the closest points of {na} and {nb}."
        return f"{length(m, d)} between the closest points of {na} and {nb}.{note}"

    if two and pair is not None and _has(q, r"o'?\s*clock|where (will|would|do|can) you find|\bdirection\b"):
        hour = (pair.direction or {}).get("clock")
        return (f"{nb} is roughly at {hour} o'clock from {na} (seen from the reference view: 12 o'clock is "
                f"straight ahead, away from the viewer; 3 o'clock is to the right).")

    if two and pair is not None and _has(q, r"distance|how far|how distant|\bapart\b|how close|\bgap\b|separat"):
        if _has(q, r"vertical"):
            return f"{na} and {nb} are {length(m, pair.vertical_distance or 0)} apart vertically (between their centres).{note}"
        if _has(q, r"horizontal"):
            return (f"{na} and {nb} are {length(m, pair.horizontal_distance or 0)} apart horizontally "
                    f"(between their centres, on the ground plane).{note}")
        return (f"{na} and {nb} are {length(m, pair.center_distance or 0)} apart (centre to centre; their closest "
                f"points are {length(m, pair.closest_distance or 0)} apart).{note}")

    if two and pair is not None and rb is not None:
        for pattern, rel in _RELATIONS:
            if not _has(q, pattern):
                continue
            holds = _holds(rel, pair)
            why = _evidence(rel, m, pair, ra, rb)
            if _has(q, r"\b(which|who)\b"):
                winner, loser = (na, nb) if holds else (nb, na)
                return f"{winner} {_CHOICE[rel]} ({why}; the other is {loser})."
            if holds:
                return f"Yes, {na} is {_PHRASE[rel]} {nb} ({why})."
            return f"No, {na} is not {_PHRASE[rel]} {nb} ({why})."

    if not two:
        if _has(q, r"width|\bwide\b|horizontal (size|dimension)|occupy horizontally|radius"):
            return f"{na} is {length(m, ra.width or 0)} wide.{note}"
        if _has(q, r"height|\btall\b|vertical (size|dimension)|vericall size|occupy vertically"):
            return f"{na} is {length(m, ra.height or 0)} tall.{note}"
        if _has(q, r"\bdepth\b|\bdeep\b|\bthick"):
            return f"{na} is {length(m, ra.depth or 0)} deep.{note}"
        if _has(q, r"\bsize\b|dimension|how big|how large|measure"):
            return (f"{na} is {length(m, ra.width or 0)} wide, {length(m, ra.height or 0)} tall and "
                    f"{length(m, ra.depth or 0)} deep.{note}")
    return CANT + ("this mode answers measurement questions only (distances, sizes, directions and comparisons "
                   "between regions), and this question is not one of them.")
