"""Progress bars for long-running management commands.

Bars go to stderr so ``--json`` output on stdout stays machine-readable, and they are drawn only
when stderr is a terminal unless asked for: logs and CI output stay free of carriage returns.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool | None = None, stream=None) -> tqdm:
    """A tqdm bar on ``stream`` (default sys.stderr). ``enabled=None`` means "only on a TTY"."""
    stream = stream if stream is not None else sys.stderr
    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=disable, dynamic_ncols=True, leave=False)
