"""What every benchmark here shares: interleaved rounds (A B A B ..., at least three), medians of
per-round figures, the command line and each side's settings at the top, and one machine-readable
``RATIO <name> <value>`` line per figure at the end.

A ratio is the median of the per-round ratios (candidate / baseline measured back to back in the
same round), not the ratio of two medians: a burst of load from another process then hits one
round's pair, not one side of the figure.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Iterable, Sequence

MIN_ROUNDS = 3


def rounds_type(value: str) -> int:
    """argparse ``type=`` for ``--rounds``: fewer than three rounds has no median worth printing."""
    try:
        rounds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if rounds < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_ROUNDS} (interleaved rounds, medians), not {rounds}")
    return rounds


def order(kinds: Sequence[str], round_index: int) -> list[str]:
    """The sides in round ``round_index``: rotated each round, so each goes first in turn."""
    shift = round_index % len(kinds)
    return [*kinds[shift:], *kinds[:shift]]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def per_round_ratios(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Rates measured in the same rounds: candidate[i] / baseline[i]."""
    if len(candidate) != len(baseline):
        raise ValueError("per-round figures of unequal length")
    return [c / b for c, b in zip(candidate, baseline)]


def print_command(title: str) -> None:
    """The exact command line (interpreter included) that produced this output."""
    print(f"# {title}")
    print(f"# command: {shlex.join(sys.orig_argv)}")


def print_settings(side: str, settings: dict) -> None:
    print(f"# settings [{side}]:")
    for key, value in settings.items():
        print(f"#   {key}: {value}")


def print_ratios(ratios: dict[str, float]) -> None:
    """The last lines of a bench's output: ``RATIO <name> <value>``, one per figure."""
    for name, value in ratios.items():
        print(f"RATIO {name} {value:.3f}")
    sys.stdout.flush()
