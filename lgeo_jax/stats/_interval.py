"""`Interval`: a point value with lower and upper bounds, the one result type of this package.

A bootstrap interval's point is the statistic on the full data; a Monte Carlo null's is the mean of the
draws. Values are float64 arrays (0-d for a scalar statistic), read-only so a frozen result stays frozen.
A bound is NaN where it is undefined (the statistic was not finite on some resample); JSON writes it as
null, since JSON has no NaN.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np


class Method(enum.Enum):
    """How an interval was obtained."""

    PROMPT_BOOTSTRAP = "prompt_bootstrap"  # resampling prompts (clusters of tokens), percentile interval
    BASIC_PROMPT_BOOTSTRAP = "basic_prompt_bootstrap"  # the same resamples, basic (reverse-percentile) interval
    ITEM_BOOTSTRAP = "item_bootstrap"  # resampling i.i.d. items (latents, seeds), percentile interval
    GROUP_BOOTSTRAP = "group_bootstrap"  # resampling groups (seeds), then items within each drawn group
    MONTE_CARLO = "monte_carlo"  # percentiles of null draws
    EXACT = "exact"  # a known value without uncertainty (e.g. a slope of 0 as the null of a trend)


def _frozen(value: Any) -> np.ndarray:
    array = np.array(value, np.float64)  # a copy: the caller's array stays theirs
    array.setflags(write=False)
    return array


def _json_values(array: np.ndarray) -> Any:
    """Nested lists (a float for 0-d) with every non-finite value as None."""
    return np.where(np.isfinite(array), array.astype(object), None).tolist()


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class Interval:
    """A statistic's point value and its [low, high] interval at `level`, elementwise for array statistics."""

    point: np.ndarray  # [*S] float64
    low: np.ndarray  # [*S]
    high: np.ndarray  # [*S]
    level: float  # e.g. 0.95: central coverage of [low, high]
    method: Method
    n_draws: int  # bootstrap resamples, or Monte Carlo null draws
    n_units: int  # prompts or items resampled; for a Monte Carlo null, the draws
    samples: np.ndarray | None = None  # [n_draws, *S] bootstrap statistics or null draws, when kept

    def __post_init__(self):
        for name in ("point", "low", "high"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if not self.point.shape == self.low.shape == self.high.shape:
            raise ValueError(f"Interval: point {self.point.shape}, low {self.low.shape} and high {self.high.shape} "
                             "must have one shape")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"Interval: level must lie in (0, 1), got {self.level}")
        if self.samples is not None:
            object.__setattr__(self, "samples", _frozen(self.samples))
            if self.samples.shape != (self.n_draws, *self.point.shape):
                raise ValueError(f"Interval: samples {self.samples.shape} must be [n_draws, *point.shape] = "
                                 f"{(self.n_draws, *self.point.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.point.shape

    def __getitem__(self, index: Any) -> Interval:
        """The interval of some elements of an array statistic, e.g. `interval[seed]`."""
        samples = None if self.samples is None else self.samples[(slice(None), *np.index_exp[index])]
        return dataclasses.replace(self, point=self.point[index], low=self.low[index], high=self.high[index],
                                   samples=samples)

    @classmethod
    def exact(cls, value: Any) -> Interval:
        """A known value as a zero-width interval (a null with no uncertainty, e.g. "no trend" = 0)."""
        return cls(point=value, low=value, high=value, level=0.95, method=Method.EXACT, n_draws=0, n_units=0)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: floats (nested lists for array statistics), None for undefined values."""
        out = {"point": _json_values(self.point), "low": _json_values(self.low), "high": _json_values(self.high),
               "level": self.level, "method": self.method.value, "n_draws": self.n_draws, "n_units": self.n_units}
        if self.samples is not None:
            out["samples"] = _json_values(self.samples)
        return out
