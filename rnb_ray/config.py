"""Typed, frozen stage configs: load from YAML/JSON, override from the CLI, save next to outputs.

Each stage has one config dataclass (``RegroupConfig`` in ``regroup/config.py``, ``TrainConfig`` in
``balance/config.py``, ``SweepConfig`` in ``sweep/config.py``). This module holds the shared machinery:

* ``load_config(cls, path, overrides)`` — file values, then overrides, then ``validate()``;
* ``read_settings(cls, path)`` / ``from_dict(cls, data, validate=False)`` — a partial settings file (a
  sweep's or pipeline's ``--train-config``) as a typed base config that a stage completes with
  ``dataclasses.replace`` and validates once;
* ``save_config(cfg, path)`` — JSON, written next to every output;
* ``add_config_args(parser, cls)`` / ``overrides_from_args(args, cls)`` — one ``--flag`` per field, so
  the CLI, the Ray jobs and the config files all speak the same names (torchtitan style).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rnb_ray import atomic
from rnb_ray.errors import RnbError

C = TypeVar("C")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with an error that names the field."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise RnbError(f"setting '{name}' must not be empty", where=source, fix=f"give a value for {name}")
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            (item_tp, *_rest) = typing.get_args(base)
            if isinstance(value, str):
                value = [v for v in (s.strip() for s in value.split(",")) if v]
            if not isinstance(value, list | tuple):
                value = [value]
            return tuple(_coerce(name, item_tp, v, source) for v in value)
        if origin is typing.Literal:
            allowed = typing.get_args(base)
            if value not in allowed:
                raise RnbError(
                    f"setting '{name}' has unknown value {value!r}",
                    where=source,
                    fix=f"use one of {', '.join(map(str, allowed))}",
                )
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
        return value
    except (TypeError, ValueError) as e:
        raise RnbError(
            f"setting '{name}' has value {value!r}, which is not a valid {getattr(base, '__name__', base)}",
            where=source,
            fix=f"give {name} a {getattr(base, '__name__', base)} value",
        ) from e


def _check_names(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise RnbError(
            f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}",
            where=source,
            fix=f"valid settings are: {', '.join(types_)}",
        )
    return types_


def from_dict(cls: type[C], data: dict[str, Any], source: str = "config", *, validate: bool = True) -> C:
    """Build a config from a plain dict; unknown keys are an error (typos must not be silent).

    Values are converted to the fields' types. ``validate=False`` builds a *base* config that a stage
    completes with ``dataclasses.replace`` and validates once, complete (``cfg.validate()``).
    """
    types_ = _check_names(cls, data, source)
    kwargs = {k: _coerce(k, types_[k], v, source) for k, v in data.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise RnbError(f"incomplete {cls.__name__}: {e}", where=source) from e
    check = getattr(cfg, "validate", None)
    if validate and check is not None:
        check()
    return cfg


def read_settings(cls: type, path: str | Path, *, where: str | None = None) -> dict[str, Any]:
    """The settings in a YAML or JSON file, as written; names are checked against ``cls``, values are not.

    ``where`` names the flag that gave the file, for the error messages.
    """
    p = Path(path)
    if not p.is_file():
        raise RnbError(f"config file {p} does not exist", where=where, fix=f"check the {where or '--config'} path")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise RnbError(f"config file {p} is not valid YAML/JSON: {e}", where=where) from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise RnbError(f"config file {p} must hold a mapping of {cls.__name__} settings, not "
                       f"{type(loaded).__name__}", where=where)
    _check_names(cls, loaded, str(p))
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """File values (YAML or JSON), then ``overrides`` (e.g. CLI flags), then validation."""
    data: dict[str, Any] = {}
    if path is not None:
        data.update(read_settings(cls, path))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, source=str(path) if path else "command line")


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, path: str | Path) -> None:
    atomic.write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per dataclass field; defaults stay None so files are not overridden."""
    parser.add_argument("--config", help="YAML/JSON file with settings (flags override it)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _unwrap_optional(_field_types(cls)[f.name])
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "default" not in helptext:  # help texts that explain their own default keep it
            helptext = f"{helptext} (default: {default})".strip()
        helptext = helptext.replace("%", "%%")  # argparse %-formats help strings ("10%" crashed --help)
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=helptext)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
