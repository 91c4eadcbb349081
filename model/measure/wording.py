"""How numbers are written in text: lengths with their unit when metric, "relative units" otherwise."""
from __future__ import annotations

from model.measure.types import Measurements

RELATIVE = "relative units (no metric scale)"


def length(m: Measurements, x: float) -> str:
    """1.23 m / 45.3 cm when metric; "0.83 relative units (no metric scale)" otherwise."""
    if m.unit != "m":
        return f"{x:.3g} {RELATIVE}"
    return f"{x:.2f} m" if abs(x) >= 1 else f"{x * 100:.1f} cm"


def volume(m: Measurements, x: float) -> str:
    return f"{x:.3g} m³" if m.unit == "m" else f"{x:.3g} cubic {RELATIVE}"


def region_name(k: int) -> str:
    return f"Region [{k}]"
