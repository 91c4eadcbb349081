"""A command's settings from the environment, or one line on stderr and exit code 2.

A refused variable is a configuration error like a bad command-line flag (argparse exits 2 too) and
like the worker's other configuration checks (service.worker_startup.EXIT_CONFIG): supervisors that
restart on failure leave code 2 alone, since a restart cannot fix the environment.
"""
from __future__ import annotations

import sys
from typing import TypeVar

from pydantic_settings import BaseSettings

from service.settings import SettingsError, load
from service.worker_startup import EXIT_CONFIG

S = TypeVar("S", bound=BaseSettings)


def settings_or_exit(role: type[S], command: str) -> S:
    try:
        return load(role)
    except SettingsError as e:
        print(f"sr3d {command}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
