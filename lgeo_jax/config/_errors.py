"""One error type for every configuration problem, reported all at once with key paths.

A config is validated completely before anything runs, so a user fixing a YAML file sees every
problem in one message (`sae.l1: expected a number > 0, got -1; lora.rankz: unknown key ...`)
instead of one per attempt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (a dotted key path) and what."""

    path: str
    message: str
    line: int | None = None

    def under(self, prefix: str) -> Problem:
        """The same problem seen from a parent section (`l1` under `sae` is `sae.l1`)."""
        if not prefix:
            return self
        sep = "" if self.path.startswith("[") or not self.path else "."
        return dataclasses.replace(self, path=f"{prefix}{sep}{self.path}")

    def __str__(self) -> str:
        where = self.path or "<top level>"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(ValueError):
    """Every problem found in a config, as one paragraph; `problems` keeps them structured."""

    def __init__(self, problems: Iterable[Problem], source: str = "config"):
        self.problems = tuple(problems)
        self.source = source
        n = len(self.problems)
        listing = "; ".join(str(p) for p in self.problems)
        super().__init__(
            f"{source}: {n} problem{'s' if n != 1 else ''}: {listing}. Fix {'them' if n != 1 else 'it'} and run again."
        )

    def with_lines(self, lines: Mapping[str, int | None], source: str) -> ConfigError:
        """The same problems annotated with the YAML line of their key (or nearest parent key);
        a key mapped to None (set by an override) stops the search: it has no line."""
        return ConfigError(
            (p if p.line is not None else dataclasses.replace(p, line=_line_of(p.path, lines)) for p in self.problems),
            source=source,
        )


def _line_of(path: str, lines: Mapping[str, int | None]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None
