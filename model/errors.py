"""The one coded-error base of the model core. Each error carries a stable `.code` and a human `.message`;
which HTTP status a code becomes is decided by the service's API layer, never here."""
from __future__ import annotations


class CodedError(Exception):
    """An error with a stable machine-readable `code` (API contract) and a `message` for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ModelInputError(CodedError, ValueError):
    """The request cannot be computed as given (a client error, never a crash).

    Codes: mask_size_mismatch, empty_mask, region_out_of_range, too_many_regions,
    placeholder_in_question, unreferenced_region, too_many_frames, bad_frames, bad_pointmap,
    bad_region_frame, prompt_too_long.
    """


class CheckpointError(CodedError, RuntimeError):
    """A checkpoint directory is incomplete, inconsistent, or asks for something we cannot serve faithfully.

    Codes: missing_file, wrong_shape, unknown_keys, missing_keys, bad_config, unsupported_config,
    no_region_weights.
    """
