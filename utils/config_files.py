"""Config files as plain data: YAML read with ``safe_load``, ``extends`` merged, dotted ``--opts`` applied.

No schema and no torch here (:mod:`utils.config` types and validates the result), so that a quick look at a run's
config, such as ``utils.lock.exit_if_busy`` reading ``output_dir``, costs a fraction of a second.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and, where known, the file."""


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML file with ``safe_load`` and merge it over the files it ``extends`` (recursively)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in seen)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, read_yaml((path.parent / parent), seen + (path.resolve(),)))
    return deep_merge(merged, data)


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) in ``override`` replaces ``base``'s value."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_opt(opt: str) -> tuple[list[str], Any]:
    """``"data.batch_size=8"`` -> ``(["data", "batch_size"], 8)``; the value is parsed as a YAML scalar/list."""
    if "=" not in opt:
        raise ConfigError(f"--opts entries are key=value with a dotted key (data.batch_size=8), got {opt!r}")
    key, raw = opt.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def parse_opts(opts: list[str]) -> dict:
    """``["data.batch_size=8", "solver.lr=1e-3"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for opt in opts or []:
        parts, value = _parse_opt(opt)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def apply_opts(data: dict, opts: list[str]) -> dict:
    """``data`` with the ``--opts`` applied in order; a number in the key picks a list item.

    ``eval.sets.0.root=data/frames`` changes one field of the first eval set and keeps the others (a mapping
    value merges into a mapping, anything else replaces); ``eval.sets=[...]`` replaces the whole list.
    """
    out = copy.deepcopy(data)
    for opt in opts or []:
        parts, value = _parse_opt(opt)
        node: Any = out
        for i, part in enumerate(parts):
            where = ".".join(parts[:i])
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--opts {opt!r}: {where} is a list of {len(node)} item(s), so the key part "
                                      f"after it must be an index 0..{len(node) - 1}, got {part!r}")
                part = int(part)
                current = node[part]
            else:
                current = node.get(part)
            if last:
                node[part] = deep_merge(current, value) if isinstance(value, dict) and isinstance(current, dict) \
                    else value
            elif isinstance(current, (dict, list)):
                node = current
            else:
                node[part] = {}
                node = node[part]
    return out


def read_config_tree(path: Optional[str | Path], opts: Optional[list[str]] = None) -> dict:
    """The config at ``path`` (None: no file) merged over the files it extends, with ``opts`` applied: plain data."""
    return apply_opts(read_yaml(Path(path)) if path else {}, opts or [])
