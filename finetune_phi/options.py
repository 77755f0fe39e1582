"""Settings as dataclasses: one field is one setting, with its type, default and help.

The same field makes the command-line flag (transformers' HfArgumentParser, as TRL's scripts use it:
`--base-model` and `--base_model` alike, `--no-X` for a setting on by default), the key of a `--config`
YAML file, and the attribute the code reads. `train` (training/config.py), `serve` (serving/options.py),
`deploy` (azureml/options.py) and `compare` (evaluation/compare.py's CompareConfig) are built this way.
Nothing heavy is imported here.
"""

from __future__ import annotations

import argparse
import difflib
import types
from dataclasses import field, fields
from functools import cache
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

from .errors import UserError


def setting(default, help: str, **argparse_kwargs):
    """A field whose metadata HfArgumentParser hands to argparse (help; aliases, nargs/const, action where needed)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@cache
def type_hints(cls) -> dict:
    return get_type_hints(cls)


def base_type(hint):
    """`X` of `X | None`, else the hint itself."""
    if get_origin(hint) in (Union, types.UnionType):
        return next(t for t in get_args(hint) if t is not type(None))
    return hint


def add_negations(parser, *classes):
    """`--no-X` for the `bool | None` settings, whose None means "decide for me" (HfArgumentParser adds
    `--no-X` only for settings that default to True)."""
    for cls in classes:
        for f in fields(cls):
            hint = type_hints(cls)[f.name]
            if base_type(hint) is bool and hint is not bool and f.default is None:
                parser.add_argument(
                    f"--no-{f.name.replace('_', '-')}",
                    f"--no_{f.name}",
                    dest=f.name,
                    action="store_false",
                    default=None,
                    help=f"turn {f.name} off",
                )


def from_namespace(cls, namespace):
    """An instance of a settings dataclass from a parsed namespace (fields not in it keep their default)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init and hasattr(namespace, f.name)})


def load_yaml_defaults(parser, path: str, classes: tuple):
    """Make the settings in a YAML file the parser's defaults, so flags on the command line override them."""
    known = {
        a.dest
        for a in parser._actions  # argparse has no public list of its settings
        if a.dest not in (argparse.SUPPRESS, "help", "config", "debug")
    }
    parser.set_defaults(**read_settings(path, classes, known))


def read_settings(path: str | Path, classes: tuple, known: set[str] | None = None) -> dict:
    """The settings in a YAML file (a recipe, a `--config` file), keyed by the flags' names (`base_model: tiny`,
    `lora: true`, `register: false`); every value is checked against the setting's type here, so a mistake names
    the file and the key. `known`: the keys allowed (default: the classes' fields)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise UserError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of setting: value, got a YAML {type(doc).__name__}")
    hints = {name: hint for cls in classes for name, hint in type_hints(cls).items()}
    known = known if known is not None else {f.name for cls in classes for f in fields(cls) if f.init}
    values = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (the keys are the command's flags, without --)"
            raise UserError(f"{path}: unknown key {key!r}{hint}")
        values[name] = _checked(value, hints.get(name, str | None), f"{path}: {name}")
    return values


def _checked(value, hint, where: str):
    """The YAML value as the setting's type, or a UserError naming the setting."""
    base = base_type(hint)
    if value is None:
        if base is not hint:  # X | None
            return None
        raise UserError(f"{where}: needs a value, not null")
    if get_origin(base) is Literal:
        if value in get_args(base):
            return value
        raise UserError(f"{where}: expected one of {', '.join(get_args(base))}, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if base in (int, float):
        what = "an integer" if base is int else "a number"
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string, as a flag's value would be
            try:
                return base(value)
            except ValueError:
                raise UserError(f"{where}: expected {what}, got {value!r}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (base is int and isinstance(value, float))
        ):
            raise UserError(f"{where}: expected {what}, got {value!r}")
        return base(value)
    if get_origin(base) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    if isinstance(value, str):
        return value
    raise UserError(f"{where}: expected a string, got {value!r}")


def whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`); anything else is argparse's one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        problem = out_of_range(value, low, high)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "number"  # what argparse calls it in its message
    return parse


def out_of_range(value: int, low: int, high: int | None) -> str | None:
    """What is wrong with value for the range low..high (no high: no upper end), or None."""
    if high is not None and not low <= value <= high:
        return f"{value} is out of range: give {low} to {high}"
    if value < low:
        return f"{value} is too small: give at least {low}"
    return None


def bound_flags(parser, *classes):
    """Give the flags of whole-number settings the range in their class's BOUNDS ({field: (low, high or None)}),
    checked as the command line is parsed (HfArgumentParser gives them plain int)."""
    bounds = {name: bound for cls in classes for name, bound in getattr(cls, "BOUNDS", {}).items()}
    for action in parser._actions:  # argparse has no public list of its settings
        if action.dest in bounds:
            action.type = whole_number(*bounds[action.dest])
        elif action.type is int:
            action.type = whole_number(-(2**63))


def check_bounds(obj):
    """The same ranges for an object built in code (the demo, the Python API): a UserError naming the flag."""
    for name, (low, high) in getattr(type(obj), "BOUNDS", {}).items():
        value = getattr(obj, name)
        problem = None if value is None else out_of_range(value, low, high)
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {problem}")
