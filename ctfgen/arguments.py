"""Argument checks, declared once beside each argument and run before a command does any work.

A constraint is a small value object: `AtLeast(1)`, `Above(0)`, `Between(0, 1, hi_open=True)`, `OneOf("a", "b")`.
- On a config dataclass field, as `steps: Annotated[int, AtLeast(1)] = 900`: `add_dataclass_args`
  turns the field into a flag that checks its value while the command line is parsed, and
  `check_fields(config)` (each config's `__post_init__`) checks configs built in Python.
- On a plain flag, as `type=arg_type(Count)` or `type=checked(int, AtLeast(1))`.
Either way a bad value ends as one line, `ctfgen CMD: error: argument --steps: must be >= 1, got 0`,
with exit status 2 (`Parser`). Checks that relate several arguments or read files stay with the
code that needs them and raise `CtfgenError` before the first step of work.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from .errors import CtfgenError


class Constraint:
    def problem(self, value: Any) -> str | None:
        """None when `value` is fine, else what is wrong with it."""
        raise NotImplementedError


@dataclass(frozen=True)
class AtLeast(Constraint):
    lo: float

    def problem(self, value: Any) -> str | None:
        return None if value >= self.lo else f"must be >= {self.lo}, got {value}"


@dataclass(frozen=True)
class Above(Constraint):
    lo: float

    def problem(self, value: Any) -> str | None:
        return None if value > self.lo else f"must be > {self.lo}, got {value}"


@dataclass(frozen=True)
class Between(Constraint):
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: Any) -> str | None:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if above and below:
            return None
        interval = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return f"must lie in {interval}, got {value}"


@dataclass(frozen=True)
class OneOf(Constraint):
    options: tuple

    def __init__(self, *options: Any):
        object.__setattr__(self, "options", tuple(options))

    def problem(self, value: Any) -> str | None:
        return None if value in self.options else f"must be one of {', '.join(map(str, self.options))}; got {value!r}"


# the constrained types most settings use
Count = Annotated[int, AtLeast(1)]  # steps, sizes, batch sizes, intervals
NonNegative = Annotated[int, AtLeast(0)]
Positive = Annotated[float, Above(0.0)]  # learning rates
Rate = Annotated[float, Between(0.0, 1.0, hi_open=True)]  # dropout probabilities, EMA decay, Adam betas
Fraction = Annotated[float, Between(0.0, 1.0, lo_open=True)]  # shares of a model's depth or steps


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value: Any, constraints: typing.Iterable[Constraint]) -> None:
    """CtfgenError naming the flag when `value` breaks a constraint (None means 'not set' and passes)."""
    if value is None:
        return
    for c in constraints:
        problem = c.problem(value)
        if problem:
            raise CtfgenError(f"{flag(name)} {problem}")


def checked(kind: Callable[[str], Any], *constraints: Constraint) -> Callable[[str], Any]:
    """An argparse `type=` that converts with `kind` and then checks the constraints."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        for c in constraints:
            problem = c.problem(value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


# --- config dataclasses ---------------------------------------------------------------------

def _split(hint: Any) -> tuple[type, tuple[Constraint, ...]]:
    """A type hint's plain type (`X | None` -> X) and its constraints."""
    constraints: tuple[Constraint, ...] = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        constraints = tuple(m for m in meta if isinstance(m, Constraint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint, constraints


def check_typed(name: str, value: Any, hint: Any) -> None:
    """`check_value` against the constraints of a constrained type (for values that come from outside argparse)."""
    check_value(name, value, _split(hint)[1])


def arg_type(hint: Any) -> Callable[[str], Any]:
    """The argparse `type=` of a constrained type: `add_argument("--images", type=arg_type(Count))`."""
    kind, constraints = _split(hint)
    return checked(kind, *constraints)


def arg_list(hint: Any) -> Callable[[str], list]:
    """The argparse `type=` of comma-separated values of a constrained type: `type=arg_list(Count)` reads "1,2,4"."""
    one = arg_type(hint)

    def convert(text: str) -> list:
        return [one(part) for part in text.split(",") if part.strip()]

    convert.__name__ = f"comma-separated {one.__name__}"
    return convert


def _field_types(cls: type) -> dict[str, tuple[type, tuple[Constraint, ...]]]:
    return {name: _split(hint) for name, hint in typing.get_type_hints(cls, include_extras=True).items()}


def check_fields(config: Any) -> None:
    """Check every constrained field of a config dataclass (called from its __post_init__)."""
    types_ = _field_types(type(config))
    for f in dataclasses.fields(config):
        check_value(f.name, getattr(config, f.name), types_[f.name][1])


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field, typed, checked and defaulted from the dataclass."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        kind, constraints = types_[f.name]
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag(f.name), type=checked(kind, *constraints), default=f.default,
                                help=f"(default: {f.default})")


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# --- the parser -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `ctfgen CMD: error: ...`, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
