"""One exception type for bad input data, and an opt-in, counted way to skip bad records.

Every loader raises `DataError(path, where, problem)`; its message is a single line that names
the file, the line or record, and what is wrong, so a user can open the file at that spot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Malformed input. `where` is a line number (int), a description ("record 7"), or None."""

    def __init__(self, path, where, problem: str):
        self.path = str(path)
        self.where = where
        self.problem = problem
        if where is None:
            location = ""
        elif isinstance(where, int):
            location = f" line {where}:"
        else:
            location = f" {where}:"
        # One line, whatever the problem text contains.
        message = f"{self.path}:{location} {problem}".replace("\r", " ").replace("\n", " ")
        super().__init__(message)

    def __reduce__(self):
        # Rebuilt from its three parts when a worker process hands it back (multiprocessing
        # pickles exceptions; the default would call DataError(message) and fail).
        return (type(self), (self.path, self.where, self.problem))


ON_ERROR_CHOICES = ("raise", "skip")


@dataclass
class SkipLog:
    """Counts records skipped under on_error='skip' (skipping is never silent)."""

    path: str = ""
    count: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, err: DataError) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def report(self) -> None:
        if self.count:
            logger.warning("skipped %d invalid record(s) in %s, e.g.: %s",
                           self.count, self.path, " | ".join(self.examples))


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
