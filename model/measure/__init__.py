"""Measured answers: distances, sizes and directions computed from the point maps (numpy only).

`measure_scene` turns a job's point maps and region masks into `Measurements` (per region: cleaned
point set, gravity-aligned box, width/height/depth; per pair: distances and directions), with the
scale stated honestly. `answer_from_measurements` writes the `measured` answer mode's text from
them, and `grounding_text` is the fixed template the `grounded` mode puts before the question.
"""
from model.geometry.types import PointMaps
from model.inputs import RegionMask
from model.measure.answer import answer_from_measurements
from model.measure.grounding import grounding_text
from model.measure.scene import measure_scene
from model.measure.types import (
    Measurements,
    OrientedBox,
    PairMeasurement,
    RegionMeasurement,
    ScaleHint,
    UpEstimate,
)

__all__ = ["PointMaps", "RegionMask", "measure_scene", "answer_from_measurements", "grounding_text",
           "Measurements", "OrientedBox", "PairMeasurement", "RegionMeasurement", "ScaleHint", "UpEstimate"]
