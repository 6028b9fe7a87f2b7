"""Typed settings: the signatures of the config targets are the schema of the configs.

A setting's range lives in its annotation, next to the parameter it constrains
(``w_max: Positive``), in ``annotated_types``' vocabulary (which pydantic also reads). ``config.py``
checks every key of every ``_target_`` section of the composed config against its target's
annotations before anything is built, so a new setting is checked the moment it is added; a test
fails for any numeric setting whose annotation gives no range.

No hydra, no Lightning here: the models, optimizers and constraints import these aliases.
"""

from __future__ import annotations

import collections.abc
import math
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

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SEQUENCES = (list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def check(value: Any, hint: Any) -> tuple[bool, str]:
    """Whether ``value`` (plain Python, as OmegaConf gives it) fits the type ``hint``, and what the
    hint allows, in words (for the one-line error)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, metadata = args[0], args[1:]
        ok, description = check(value, base)
        bounds = _range(metadata)
        if not bounds:
            return ok, description
        kind = "an integer" if base is int else "a number"
        description = _describe_range(kind, bounds)
        if not ok:
            return False, description
        return all(
            {"gt": value > b, "ge": value >= b, "lt": value < b, "le": value <= b}[key] for key, b in bounds
        ), description
    if origin in (Union, types.UnionType):
        options = [check(value, arg) for arg in args]
        descriptions = ["null" if arg is type(None) else text for arg, (_, text) in zip(args, options)]
        return any(ok for ok, _ in options), " or ".join(descriptions)
    if origin is Literal:
        return value in args, f"one of {list(args)}"
    if hint is type(None):
        return value is None, "null"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return _is_number(value), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. betas
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        ok = ok and all(check(v, a)[0] for v, a in zip(value, args))
        return ok, f"{len(args)} values, each {check(None, args[0])[1]}"
    if origin in _SEQUENCES:
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(check(v, inner)[0] for v in value), f"a list, each {check(None, inner)[1]}"
    if origin in _MAPPINGS:
        key_hint, value_hint = args or (Any, Any)
        ok = isinstance(value, dict) and all(check(k, key_hint)[0] and check(v, value_hint)[0] for k, v in value.items())
        return ok, f"a mapping from {check(None, key_hint)[1]} to {check(None, value_hint)[1]}"
    return True, "anything"  # Any, or a type the configs do not use


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
