"""Reading plans from TOML / YAML files (or passing through dicts and ``Plan`` objects)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .schema import Plan

__all__ = ["load_plan"]

_SUFFIXES = (".toml", ".yaml", ".yml")


def load_plan(plan: Plan | Mapping[str, Any] | str | os.PathLike[str]) -> Plan:
    """A ``Plan`` from a ``Plan`` (returned as is), a dict, or a path to a ``.toml``/``.yaml``/``.yml`` file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a parse error,
    an unknown key or a wrong value.
    """
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    if not isinstance(plan, (str, os.PathLike)):
        raise TypeError(f"load_plan takes a Plan, a dict or a path to a plan file, got {type(plan).__name__}")
    path = Path(plan)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"plan file '{path}' must end in {', '.join(_SUFFIXES)}, got '{path.suffix}'")
    if not path.is_file():
        raise FileNotFoundError(f"plan file '{path}' does not exist (resolved: {path.resolve()})")
    data = _parse(path, suffix)
    try:
        return Plan.from_dict(data)
    except ValueError as e:
        raise ValueError(f"plan file '{path}': {e}") from None


def _parse(path: Path, suffix: str) -> Mapping[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            data = _toml_loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError: report both the same way
        raise ValueError(f"could not parse plan file '{path}': {e}") from e
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"plan file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "reading .toml plans on Python 3.10 needs the 'tomli' package (pip install tomli), "
                "or use a .yaml plan"
            ) from None
    return tomllib.loads(text)
