"""What a setting admits: the signatures of the config targets are the schema of the configs.

A setting's range lives in its annotation, next to the parameter it constrains
(``w_max: Positive``), in ``annotated_types``' vocabulary, which pydantic reads:
``commands.settings`` checks every key of every ``_target_`` section of the composed config
against its target's annotations with pydantic before anything is built, so a new setting is
checked the moment it is added; a test fails for any numeric setting whose annotation gives no range.

No torch, no hydra, no Lightning here: the models, optimizers and constraints import these aliases,
and the settings' checks read them (a radius too: ``Radius``, ``parse_radius``) before torch is imported.
"""

from __future__ import annotations

import collections.abc
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types as at

Positive = Annotated[float, at.Gt(0)]
NonNegative = Annotated[float, at.Ge(0)]
UnitInterval = Annotated[float, at.Interval(ge=0, lt=1)]  # momenta, betas, decay fractions
PositiveInt = Annotated[int, at.Ge(1)]
NonNegativeInt = Annotated[int, at.Ge(0)]
Betas = tuple[UnitInterval, UnitInterval]


class Described:
    """A test for an ``annotated_types.Predicate`` that says in words what it admits (for ``describe``)."""

    def __init__(self, description: str, test):
        self.description, self.test = description, test

    def __call__(self, value) -> bool:
        return self.test(value)


# "36/255": a radius written as certify reports it (its tables give radii in units of 1/255)
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _is_fraction(text: str) -> bool:
    match = _FRACTION.match(text)
    return match is not None and float(match.group(2)) > 0


Radius = NonNegative | Annotated[str, at.Predicate(Described("a fraction such as 36/255", _is_fraction))]


def parse_radius(radius: float | str) -> float:
    """A float, or a fraction ``"36/255"`` (what ``loss.radius=36/255`` gives on the command line)."""
    if isinstance(radius, str):
        if not _is_fraction(radius):
            raise ValueError(f"a radius must be a non-negative number or a fraction such as 36/255, got {radius!r}")
        match = _FRACTION.match(radius)
        return float(match.group(1)) / float(match.group(2))
    return float(radius)


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SEQUENCES = (list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _range(metadata) -> list[tuple[str, float]]:
    bounds = []
    for item in metadata:
        for key in _BOUNDS:
            bound = getattr(item, key, None)
            if bound is not None:
                bounds.append((key, bound))
    return bounds


def _describe_range(kind: str, bounds: list[tuple[str, float]]) -> str:
    keys = dict(bounds)
    if "ge" in keys and ("lt" in keys or "le" in keys):
        upper = ")" if "lt" in keys else "]"
        return f"{kind} in [{keys['ge']:g}, {keys.get('lt', keys.get('le')):g}{upper}"
    return " ".join([kind] + [f"{_BOUNDS[key]} {bound:g}" for key, bound in bounds])


def describe(hint: Any) -> str:
    """What a type ``hint`` admits, in words, for a one-line error: ``a number > 0``, ``one of ['a', 'b']``,
    ``an integer >= 1 or null``. (pydantic decides whether a value fits: ``commands.settings.check``.)"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        described = next((item.func.description for item in args[1:] if isinstance(item, at.Predicate) and isinstance(item.func, Described)), None)
        if described is not None:
            return described
        base, bounds = args[0], _range(args[1:])
        least = next((item.min_length for item in args[1:] if isinstance(item, at.MinLen)), 0)
        if least and (typing.get_origin(base) in _SEQUENCES or base is str):
            return "a non-empty " + describe(base).removeprefix("a ")
        if not bounds:
            return describe(base)
        return _describe_range("an integer" if base is int else "a number", bounds)
    if origin in (Union, types.UnionType):
        if int in args and float in args:  # every integer is a number: say it once
            args = tuple(arg for arg in args if arg is not int)
        return " or ".join("null" if arg is type(None) else describe(arg) for arg in args)
    if origin is Literal:
        return f"one of {list(args)}"
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. betas
        return f"{len(args)} values, each {describe(args[0])}"
    if origin in _SEQUENCES:
        return f"a list, each {describe(args[0] if args else Any)}"
    if origin in _MAPPINGS:
        key_hint, value_hint = args or (Any, Any)
        return f"a mapping from {describe(key_hint)} to {describe(value_hint)}"
    return "anything"


def has_range(hint: Any) -> bool:
    """Whether every number a hint admits is bounded (a range or a set of choices): a bare
    ``int`` or ``float`` is not, so a test can insist that no setting is left unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return bool(_range(args[1:])) or has_range(args[0])
    if hint in (int, float):
        return False
    if origin in (Union, types.UnionType, tuple, *_SEQUENCES, *_MAPPINGS):
        return all(has_range(arg) for arg in args if arg not in (type(None), Ellipsis))
    return True
