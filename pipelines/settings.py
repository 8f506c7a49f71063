"""A job's YAML settings: its defaults file, a user's override file, each value checked before any work.

    rules = {"seed": whole(0), "lr": number(above=0), "loss": choice("mse", "neg_pearson"),
             "hr_range": ascending(number(above=0)), "crop_sizes": some_of(36, 128, required=(36,)), ...}
    settings = load_settings(DEFAULTS, path, rules)     # JobError naming the file, the key and why

An unknown key, a value of the wrong type or out of range ends the run in one line naming the key: never
a worker's traceback, never a silently ignored setting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple

import fsspec
import yaml

from pipelines.errors import JobError


class Rule(NamedTuple):
    accept: Callable[[object], bool]
    expected: str  # what the error says was expected


def whole(minimum: int = 0, multiple_of: int = 1) -> Rule:
    extra = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum and v % multiple_of == 0,
                f"a whole number, {minimum} or more{extra}")


def number(minimum: float | None = None, above: float | None = None, below: float | None = None,
           maximum: float | None = None) -> Rule:
    """A finite number within the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    bounds = [(minimum, lambda v, b: v >= b, "at least"), (above, lambda v, b: v > b, "above"),
              (below, lambda v, b: v < b, "below"), (maximum, lambda v, b: v <= b, "at most")]
    bounds = [(b, test, word) for b, test, word in bounds if b is not None]
    words = " and ".join(f"{word} {b:g}" for b, _, word in bounds)
    return Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and all(test(v, b) for b, test, _ in bounds), f"a number{' ' + words if words else ''}")


def choice(*options: str) -> Rule:
    return Rule(lambda v: v in options, f"one of {', '.join(options)}")


def some_of(*options, required=()) -> Rule:
    """A list of distinct values from `options` that holds every one of `required`."""
    need = f", including {', '.join(map(str, required))}" if required else ""
    return Rule(lambda v: isinstance(v, list) and len(set(map(repr, v))) == len(v)
                and all(any(x == o and type(x) is type(o) for o in options) for x in v)
                and all(r in v for r in required),
                f"a list of distinct values from {', '.join(map(str, options))}{need}")


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")


def optional(rule: Rule) -> Rule:
    """The rule, or null (YAML `null` or `~`): off."""
    return Rule(lambda v: v is None or rule.accept(v), f"{rule.expected}, or null")


def mapping(rule: Rule) -> Rule:
    """A mapping of names to values passing `rule` (YAML `{filters: 8, d_state: 16}`); which names a job
    knows, it checks itself."""
    return Rule(lambda v: isinstance(v, dict) and all(isinstance(k, str) and rule.accept(x) for k, x in v.items()),
                f"a mapping of names to {rule.expected}")


def ascending(rule: Rule, n: int = 2) -> Rule:
    """n values, each passing `rule`, each below the next (a range LOW HIGH)."""
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == n and all(rule.accept(x) for x in v)
                and all(a < b for a, b in zip(v, v[1:])), f"{n} values, each {rule.expected}, in increasing order")


def check(settings: dict, rules: dict[str, Rule], where: str) -> dict:
    """settings, each value checked by its rule; JobError for an unknown key or a bad value, naming it
    (after `where:`, the file or what the settings are; "" for none)."""
    at = f"{where}: " if where else ""
    unknown = sorted(set(settings) - set(rules))
    if unknown:
        raise JobError(f"{at}unknown settings {', '.join(unknown)}; known: {', '.join(sorted(rules))}")
    for key, rule in rules.items():
        if key not in settings:
            raise JobError(f"{at}setting {key} is missing")
        if not rule.accept(settings[key]):
            raise JobError(f"{at}{key}: expected {rule.expected}, got {settings[key]!r}")
    return settings


def load_settings(defaults: Path, path: str | None, rules: dict[str, Rule]) -> dict:
    """The defaults file's settings, overridden by the YAML at `path` (any fsspec URI), all checked."""
    settings = check(yaml.safe_load(defaults.read_text()), rules, str(defaults))
    if path:
        try:
            with fsspec.open(path, "r") as f:
                override = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise JobError(f"{path}: cannot read the config: {' '.join(str(e).split())}") from None  # YAML's: 4 lines
        if not isinstance(override, dict):
            raise JobError(f"{path}: expected settings as YAML keys and values, got {type(override).__name__}")
        settings = check({**settings, **override}, rules, path)
    return settings
