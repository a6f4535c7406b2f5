"""Config values: the `bounded` fields, `key=value` overrides parsed by each field's
type, and validation of a whole config, with errors (`ConfigError`) naming the key.
"""

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar

Section = TypeVar("Section")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def bounded(default, *, gt=None, ge=None, lt=None, le=None):
    """A section field whose numeric value `validate` keeps within these bounds
    (greater than, greater or equal, less than, less or equal); None passes where
    the field's type allows it.

    Args:
        default: the field's default value.
        gt: exclusive lower bound, or None.
        ge: inclusive lower bound, or None.
        lt: exclusive upper bound, or None.
        le: inclusive upper bound, or None.

    Returns:
        A `dataclasses.field` carrying the bounds in its metadata.
    """
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    bounds = {k: v for k, v in bounds.items() if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def _bounds_text(bounds: dict) -> str:
    """'positive', 'in (0, 1]', '>= 1', ... for the bounds of `bounded`."""
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (
        (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    )
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low == ("(", 0):
        return "positive"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]}"
    return f"{'<' if high[0] == ')' else '<='} {high[1]}"


def _within(value, bounds: dict) -> bool:
    return (
        ("gt" not in bounds or value > bounds["gt"])
        and ("ge" not in bounds or value >= bounds["ge"])
        and ("lt" not in bounds or value < bounds["lt"])
        and ("le" not in bounds or value <= bounds["le"])
    )


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse(text: str, tp, key: str):
    """Parse command-line `text` as a value of type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _parse(text, option, key)
            except ConfigError:
                pass
    elif tp is type(None):
        if text.lower() in ("none", "null"):
            return None
    elif tp is bool:
        if text.lower() in ("true", "1", "yes", "false", "0", "no"):
            return text.lower() in ("true", "1", "yes")
    elif tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            pass
    elif tp is str:
        return text
    elif origin in (tuple, list):
        (item, *_) = typing.get_args(tp)
        return origin(_parse(part.strip(), item, key) for part in text.split(",") if part.strip())
    raise ConfigError(f"{key}={text!r} cannot be read as {_type_name(tp)}.")


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _unknown_key(key: str, name: str, section, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
    where = f"under {prefix[:-1]!r}" if prefix else "at the top level"
    return ConfigError(f"unknown config key {key!r}.{hint} Valid keys {where}: {', '.join(names)}.")


def override(config: Section, assignment: str) -> Section:
    """Return `config` with one `dotted.key=value` assignment applied (a new object).

    The value is parsed by the field's declared type (Literal choices, unions, bools
    as true/false/1/0/yes/no, comma-separated tuples and lists, "none" for None).

    Args:
        config: the config (or any dataclass section) to change; left unchanged.
        assignment: "dotted.key=value", e.g. "train.steps=100".

    Returns:
        A copy of `config` with the field replaced.

    Raises:
        ConfigError: no "=", an unknown key (with the closest valid one), a key that
            names a section or goes below a value, or a value of the wrong type.
    """
    if "=" not in assignment:
        raise ConfigError(
            f"override {assignment!r} is not of the form key=value (e.g. train.steps=100)."
        )
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")

    def apply(section, depth: int):
        prefix = "".join(p + "." for p in parts[:depth])
        name = parts[depth]
        if not dataclasses.is_dataclass(section):
            raise ConfigError(
                f"config key {prefix[:-1]!r} is a value, not a section; "
                f"set {prefix[:-1]}=... instead of {key!r}."
            )
        if name not in {f.name for f in dataclasses.fields(section)}:
            raise _unknown_key(key, name, section, prefix)
        current = getattr(section, name)
        if depth + 1 < len(parts):
            return dataclasses.replace(section, **{name: apply(current, depth + 1)})
        if dataclasses.is_dataclass(current):
            fields = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(current))
            raise ConfigError(f"config key {key!r} is a section; set one of its keys: {fields}.")
        tp = typing.get_type_hints(type(section))[name]
        return dataclasses.replace(section, **{name: _parse(text, tp, key)})

    return apply(config, 0)


def validate(config: Section) -> Section:
    """Check every field's value against its declared type and range; return it.

    Numbers must be finite; fields declared with `bounded` must lie within their
    bounds, other integers must not be negative.

    Args:
        config: the config to check (nested sections are walked).

    Returns:
        `config` itself.

    Raises:
        ConfigError: naming the first key whose value is wrong and what it must be.
    """

    def walk(section, prefix: str):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            value, key = getattr(section, f.name), prefix + f.name
            bounds = f.metadata.get("bounds")
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif not _matches(value, hints[f.name]):
                raise ConfigError(
                    f"{key}={value!r} has type {type(value).__name__}; "
                    f"expected {_type_name(hints[f.name])}."
                )
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            elif not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number.")
            elif bounds and not _within(value, bounds):
                raise ConfigError(f"{key}={value} must be {_bounds_text(bounds)}.")
            elif not bounds and isinstance(value, int) and value < 0:
                raise ConfigError(f"{key}={value} must not be negative.")

    walk(config, "")
    return config
