"""Run configs: dataclasses that map one-to-one onto YAML files and command-line flags.

A field `batch_size` is the YAML key `batch_size` and the flag `--batch-size`; the precedence is
dataclass default < `--config` YAML < flags given. The resolved config is saved with each run.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import atomic_write_text, read_yaml


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """(base type, is_list) of an annotation such as `int | None` or `list[str]`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if typing.get_origin(tp) is list:
        return (args[0] if args else str), True
    return tp, False


def _parse_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls, skip=(), help: dict | None = None):
    """One flag per dataclass field (default None = "not given", so YAML values survive)."""
    help = help or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base, is_list = _base_type(_field_types(cls)[f.name])
        kw = {"default": None, "dest": f.name, "help": help.get(f.name)}
        if is_list:
            kw.update(type=_parse_list, metavar="A,B,...")
        elif base is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="true|false")   # bare --pack = true
        else:
            kw.update(type=base)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def _scalar(value, base):
    """value as `base` (int, float, bool, str), or ValueError."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise ValueError
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError   # true where a number belongs, a mapping where a name belongs
    if base is int:
        number = float(value) if isinstance(value, str) and not value.strip().lstrip("+-").isdigit() else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    if base is float:
        return float(value)
    if base is str:
        return value if isinstance(value, str) else str(value)
    return value


def coerce(value, annotation, where: str):
    """A YAML value as its dataclass field's type. YAML 1.1 reads `lr: 2e-5` as a string and
    `epochs: 3.0` as a float; a list field takes a YAML list or "a,b,c". `where`: the key and the
    file, for the error."""
    if value is None:
        return None
    base, is_list = _base_type(annotation)
    try:
        if is_list:
            items = _parse_list(value) if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError
            return [_scalar(v, base) for v in items]
        return _scalar(value, base)
    except (ValueError, TypeError, OverflowError):
        kind = f"a list of {base.__name__}" if is_list else getattr(base, "__name__", str(base))
        raise LlamaforgeError(f"{where}: expected {kind}, found {value!r}") from None


def read_config_values(cls, yaml_path: str | Path) -> dict:
    """The settings of a YAML file, each as its field's type; an unknown key is an error."""
    values = read_yaml(yaml_path)
    types_ = _field_types(cls)
    for k in values:
        if k not in types_ or k not in {f.name for f in dataclasses.fields(cls)}:
            raise LlamaforgeError(f"{yaml_path}: unknown setting {k!r}")
        values[k] = coerce(values[k], types_[k], f"{yaml_path}: {k}")
    return values


def resolve_config(cls, yaml_path: str | Path | None = None, overrides: dict | None = None):
    """cls(**(YAML values updated by overrides that are not None)); unknown keys are errors."""
    values = read_config_values(cls, yaml_path) if yaml_path else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in names})
    try:
        return cls(**values)
    except TypeError as e:
        raise LlamaforgeError(f"{yaml_path or 'config'}: {e}") from None


def write_yaml(config, path: str | Path):
    import yaml
    atomic_write_text(Path(path), yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))
