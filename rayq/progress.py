"""Progress of long phases: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

# Without a terminal, a line is logged each time another tenth of the work is done.
LOG_STEPS = 10


@contextmanager
def phase(name: str, total: int, unit: str = "batches") -> Iterator[Callable[[int], None]]:
    """Yield a function that advances the phase by n items."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=name, unit=unit.rstrip("s"), file=sys.stderr, leave=False) as bar:
            yield bar.update
        return

    done = 0
    next_report = 1
    started = time.perf_counter()

    def advance(count: int) -> None:
        nonlocal done, next_report
        done += count
        if total and done * LOG_STEPS >= next_report * total:
            next_report = done * LOG_STEPS // total + 1
            logger.info("%s: %d/%d %s (%.0f s)", name, done, total, unit,
                        time.perf_counter() - started)

    yield advance
