"""Errors the model core raises. Each carries a stable `.code` the service maps to a 4xx/5xx JSON body."""
from __future__ import annotations


class ModelInputError(ValueError):
    """The request cannot be computed as given (a client error, never a crash).

    Codes: mask_size_mismatch, empty_mask, region_out_of_range, too_many_regions,
    placeholder_in_question, unreferenced_region, too_many_frames, bad_frames, bad_pointmap,
    bad_region_frame, prompt_too_long.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or inconsistent.

    Codes: missing_file, wrong_shape, unknown_keys, missing_keys, bad_config.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
