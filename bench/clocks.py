"""The clock a micro-benchmark reads (--clock): wall time, or the process's CPU time, steadier
on a shared machine with one thread (it leaves out time spent waiting for a core; with more
threads it would add up every thread's time, spinning included)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="cpu: one thread only")


def chosen_clock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[], float]:
    """args.clock, refused (a usage error) for CPU time over more than one thread."""
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's work: use --threads 1")
    return CLOCKS[args.clock]
