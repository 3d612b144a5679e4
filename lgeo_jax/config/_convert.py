"""Plain YAML/JSON values <-> typed frozen dataclasses, collecting every problem on the way.

Every config section derives from :class:`Section`. Its `__post_init__` converts each field to its
annotated type (lists -> tuples, strings -> enums, mappings -> nested sections), runs the field's
declared check, then the section's cross-field checks, and raises one :class:`ConfigError` listing
everything wrong. The same path runs for YAML input and for sections built in Python, so there is
one validator, not two that drift apart. Every package declares its own settings as a `Section` (the
`@section` decorator: a frozen, keyword-only dataclass) and this module is all they share; it imports
nothing else from lgeo_jax.

Supported annotations: `int`, `float`, `bool`, `str`, enums, `X | None` (and `X | Literal["word"] | None`, the
word taken as is), `tuple[X, ...]`, `tuple[X, Y]`, `Mapping[K, V]` (stored read-only) and nested `Section`s.
Numbers are strict (a bool is not an int) with one concession to YAML 1.1: PyYAML reads `1e-4` (no dot) as a
*string*, so numeric strings are accepted where a number is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lgeo_jax.config._errors import ConfigError, Problem

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "<required>"})()
"""Default of a field that has no sensible default; leaving it unset is reported, not a TypeError."""

_DERIVED: Any = type("Derived", (), {"__repr__": lambda self: "<derived>"})()
"""Default of a field whose default depends on other fields (`field(derived=...)`); resolved on construction."""

_INVALID = object()
_NUMBER = re.compile(r"^[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?$")

Check = Callable[[Any], Iterator[tuple[str, str]]]
"""A field check: yields (sub-path such as "[2]" or "", message) for each problem in a converted value."""


def default_of(base: type, name: str, default: Any) -> Any:
    """Field `name` of section `base` with another default and everything else (check, hash role) kept: how a
    preset section (the built-in tiny model) changes defaults without restating the rules."""
    meta = base.__dataclass_fields__[name].metadata
    return field(default, check=meta["check"], affects_results=meta["affects_results"])


def section(cls: type) -> type:
    """Declares a config section: a frozen, keyword-only dataclass (so sections can extend each other
    without field-order trouble) whose fields are converted and validated by `Section.__post_init__`."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def field(default: Any = REQUIRED, *, check: Check | None = None, affects_results: bool = True,
          derived: Callable[[Any], Any] | None = None) -> Any:
    """A config field. `affects_results=False` marks operational knobs (batch sizes for inference,
    checkpoint cadence, chunk sizes) that are left out of the section hash so changing them never
    invalidates finished work. `derived(section)` gives the default from the section's other (converted)
    fields when the key is not set, e.g. a coefficient that only one architecture uses."""
    meta = {"check": check, "affects_results": affects_results, "derived": derived}
    if derived is not None:
        return dataclasses.field(default=_DERIVED, metadata=meta)
    if type(default).__hash__ is None:  # an immutable mapping proxy: share it, dataclasses refuse it as a default
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Section:
    """Base of every frozen config dataclass: converts and validates fields on construction."""

    def __post_init__(self):
        problems: list[Problem] = []
        bad: set[str] = set()
        hints = typing.get_type_hints(type(self))
        fields = dataclasses.fields(self)
        # Derived defaults last: they read the other fields' converted values.
        for f in sorted(fields, key=lambda f: getattr(self, f.name) is _DERIVED):
            raw = getattr(self, f.name)
            if raw is _DERIVED:
                if bad:  # its inputs may be invalid; the problems already found are reported instead
                    bad.add(f.name)  # unresolved, so the cross-checks that read it are skipped too
                    continue
                raw = f.metadata["derived"](self)
            before = len(problems)
            if raw is REQUIRED:
                problems.append(Problem(f.name, "required key missing"))
            else:
                value = convert(raw, hints[f.name], f.name, problems)
                if value is not _INVALID:
                    object.__setattr__(self, f.name, value)
                    check = f.metadata.get("check")
                    if check is not None and value is not None:
                        problems.extend(Problem(f.name + sub, msg) for sub, msg in check(value))
            if len(problems) > before:
                bad.add(f.name)
        for method in _cross_check_methods(type(self)):
            if bad.isdisjoint(method.cross_check_fields):
                problems.extend(method(self))
        if problems:
            raise ConfigError(problems, source=type(self).__name__)


def cross_check(*fields: str) -> Callable:
    """Marks a `Section` method yielding `Problem`s about several fields; it runs whenever those
    fields are individually valid, so one bad field never hides an unrelated problem."""

    def mark(method):
        method.cross_check_fields = fields
        return method

    return mark


def _cross_check_methods(cls: type) -> list[Callable]:
    return [m for klass in reversed(cls.__mro__) for m in vars(klass).values() if hasattr(m, "cross_check_fields")]


def from_mapping(cls: type[Section], raw: Any, path: str, problems: list[Problem]) -> Any:
    """Builds section `cls` from a mapping, reporting unknown keys (with a suggestion) and
    everything the section itself rejects; returns `_INVALID` if it cannot be built."""
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"expected a mapping of {cls.__name__} keys, got {_show(raw)}"))
        return _INVALID
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key in names:
            kwargs[key] = value
            continue
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
        problems.append(Problem(f"{path}.{key}" if path else str(key), f"unknown key{hint}"))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(p.under(path) for p in e.problems)
        return _INVALID


def convert(raw: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """`raw` as type `tp`, or `_INVALID` after appending a problem at `path`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        arms = [a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        if raw is None or (isinstance(raw, str) and raw in words):
            return raw
        if len(arms) != 1:
            raise TypeError(f"{path}: only `X | None` unions (plus Literal words) are supported in config fields")
        if words and isinstance(raw, str) and not _NUMBER.match(raw.strip()):
            problems.append(Problem(path, f"expected {' or '.join(map(repr, words))} or a value of type "
                                          f"{arms[0].__name__}, got {_show(raw)}"))
            return _INVALID
        return convert(raw, arms[0], path, problems)
    if isinstance(tp, type) and issubclass(tp, Section):
        return raw if isinstance(raw, tp) else from_mapping(tp, raw, path, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(raw, tp, path, problems)
    if origin is tuple:
        return _convert_tuple(raw, args, path, problems)
    if origin in (dict, Mapping):
        return _convert_dict(raw, args, path, problems)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        problems.append(Problem(path, f"expected true or false, got {_show(raw)}"))
        return _INVALID
    if tp is int:
        number = _as_number(raw)
        if number is not None and float(number).is_integer() and math.isfinite(number):
            return int(number)
        problems.append(Problem(path, f"expected an integer, got {_show(raw)}"))
        return _INVALID
    if tp is float:
        number = _as_number(raw)
        if number is not None and math.isfinite(number):
            return float(number)
        problems.append(Problem(path, f"expected a number, got {_show(raw)}"))
        return _INVALID
    if tp is str:
        if isinstance(raw, str):
            return raw
        problems.append(Problem(path, f"expected a string, got {_show(raw)}"))
        return _INVALID
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def _as_number(raw: Any) -> float | int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return raw
    if isinstance(raw, str) and _NUMBER.match(raw.strip()):
        text = raw.strip().replace("_", "")
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _convert_enum(raw: Any, tp: type[enum.Enum], path: str, problems: list[Problem]) -> Any:
    if isinstance(raw, tp):
        return raw
    choices = [m.value for m in tp]
    if isinstance(raw, str) and raw in choices:
        return tp(raw)
    close = difflib.get_close_matches(str(raw), choices, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    problems.append(Problem(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {_show(raw)}{hint}"))
    return _INVALID


def _convert_tuple(raw: Any, args: tuple, path: str, problems: list[Problem]) -> Any:
    homogeneous = len(args) == 2 and args[1] is Ellipsis
    if not isinstance(raw, list | tuple):
        what = "a list" if homogeneous else f"a list of {len(args)} items"
        problems.append(Problem(path, f"expected {what}, got {_show(raw)}"))
        return _INVALID
    if not homogeneous and len(raw) != len(args):
        problems.append(Problem(path, f"expected a list of {len(args)} items, got {len(raw)}: {_show(raw)}"))
        return _INVALID
    item_types = [args[0]] * len(raw) if homogeneous else list(args)
    items = [convert(x, t, f"{path}[{i}]", problems) for i, (x, t) in enumerate(zip(raw, item_types, strict=True))]
    return _INVALID if any(x is _INVALID for x in items) else tuple(items)


def _convert_dict(raw: Any, args: tuple, path: str, problems: list[Problem]) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {_show(raw)}"))
        return _INVALID
    out = {}
    for key, value in raw.items():
        k = convert(key, args[0], f"{path}.{key}", problems)
        v = convert(value, args[1], f"{path}.{key}", problems)
        if k is not _INVALID and v is not _INVALID:
            out[k] = v
    return types.MappingProxyType(out) if len(out) == len(raw) else _INVALID


def to_plain(value: Any, *, results_only: bool = False) -> Any:
    """A section (or any config value) as plain YAML/JSON data: enums by value, tuples as lists.
    `results_only` drops fields marked `affects_results=False` (what the section hash sees)."""
    if isinstance(value, Section):
        return {
            f.name: to_plain(getattr(value, f.name), results_only=results_only)
            for f in dataclasses.fields(value)
            if not results_only or f.metadata.get("affects_results", True)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_plain(v, results_only=results_only) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v, results_only=results_only) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- field checks -------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "an integer" if isinstance(value, int) else "a number"


def greater(bound: float) -> Check:
    def check(value):
        if not value > bound:
            yield "", f"expected {_kind(value)} > {bound:g}, got {_show(value)}"

    return check


def at_least(bound: float) -> Check:
    def check(value):
        if not value >= bound:
            yield "", f"expected {_kind(value)} >= {bound:g}, got {_show(value)}"

    return check


def in_range(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    """`lo <= value <= hi` (or `< hi` when `hi_open`)."""

    def check(value):
        if not (lo <= value < hi if hi_open else lo <= value <= hi):
            yield "", f"expected a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {_show(value)}"

    return check


def each(item_check: Check) -> Check:
    """Applies `item_check` to every element of a tuple, reporting `[i]` sub-paths."""

    def check(values):
        for i, v in enumerate(values):
            for sub, msg in item_check(v):
                yield f"[{i}]{sub}", msg

    return check


def nonempty_distinct(item_check: Check | None = None) -> Check:
    """A non-empty tuple without repeats, each item passing `item_check`."""

    def check(values):
        if not values:
            yield "", "expected a non-empty list, got []"
            return
        seen = [v for i, v in enumerate(values) if v in values[:i]]
        if seen:
            yield (
                "",
                f"expected distinct values, got {_show(list(values))} (repeated: {_show(sorted(set(seen)))})",
            )
        if item_check is not None:
            yield from each(item_check)(values)

    return check


def one_of(choices: tuple[str, ...], what: str) -> Check:
    """A string from a fixed vocabulary (split names, module names), with a suggestion."""

    def check(value):
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            yield "", f"unknown {what} {value!r}; expected one of {', '.join(choices)}{hint}"

    return check


def split_range() -> Check:
    """A half-open index range `[start, stop)` with 0 <= start < stop."""

    def check(value):
        start, stop = value
        if not 0 <= start < stop:
            yield "", f"expected [start, stop) with 0 <= start < stop, got [{start}, {stop}]"

    return check
