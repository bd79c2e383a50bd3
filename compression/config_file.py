"""Reading run configs (YAML): the one place a training, distillation, pruning, trimming or
pipeline YAML is parsed and checked against its dataclass, so that a mistake in the file is
one line naming the file and where in it (line and column, or the key), not a traceback.
Torch-free: the CLI catches ConfigError (and NotAModelFolder) and prints it."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the line or the key."""


class NotAModelFolder(FileNotFoundError):
    """A path given as a model folder lacks one of its files (every offline command says so in one line)."""


def load_yaml(path: str | Path) -> dict:
    """The mapping a YAML file holds ({} for an empty file); ConfigError for anything else."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = e.problem or "syntax error"
        if e.context:
            problem += f" ({e.context})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got a {type(raw).__name__}")
    return raw


def check_fields(cls: type, raw: dict, path: str | Path, prefix: str = "") -> None:
    """Every key of `raw` is a field of dataclass `cls` and every value has the field's type
    (ints pass for floats; nested containers are checked at the top level only)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1, cutoff=0.8) for k in unknown}
        keys = ", ".join(prefix + k + (f" (did you mean {prefix}{close[k][0]}?)" if close[k] else "") for k in unknown)
        hint = "" if all(close.values()) else f"; known keys: {', '.join(known)}"
        raise ConfigError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {keys}{hint}")
    for key, value in raw.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            note = ""
            if isinstance(value, str) and _matches(0.5, hint) and _is_number(value):
                note = f" (YAML reads {value} as a string: write it with a decimal point, e.g. 1.0e-4)"
            raise ConfigError(f"{path}: {prefix}{key}: expected {_describe(hint)}, got {type(value).__name__} {value!r}{note}")


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    base = origin or hint
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, base) if isinstance(base, type) else True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    base = typing.get_origin(hint) or hint
    names = {dict: "a mapping", list: "a list", tuple: "a list", str: "a string", bool: "true/false"}
    return names.get(base, getattr(base, "__name__", str(base)))
