"""Plain data <-> the typed config (``config.Config``): conversion, overrides, and the strict YAML both go through.

``config_from_dict`` builds the dataclasses from nested plain data (a parsed file, a
checkpoint's copy): an unknown key is an error naming the nearest valid one, a value of
the wrong type an error naming the key and what it expects. ``config_to_dict`` gives
plain dicts back, to be written next to the run and stored in checkpoints that load with
``torch.load(weights_only=True)``. ``apply_overrides`` sets dotted ``key=value`` items;
their values, like the config files, are YAML read by ``load_yaml``, which refuses a key
given twice and a document bigger or deeper than a config can be (``MAX_YAML_VALUES``,
``MAX_YAML_DEPTH``, aliases expanded).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from .config import IMPLIED_BY_OVERRIDE, Config, ConfigError, validate

__all__ = [
    "MAX_YAML_DEPTH",
    "MAX_YAML_VALUES",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "default_output",
    "load_yaml",
    "overridden_keys",
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values ({', '.join(_type_name(a) for a in typing.get_args(tp))})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key`` and what it expects."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads '1e-4' (no dot) as a string; accept it as the number it clearly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"unsupported schema type {tp!r} for '{key}'")


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        k = prefix + f.name
        keys.append(k)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], k + ".")
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    # A key that exists in another section is the likeliest slip ('train.lr' -> 'optim.lr');
    # otherwise the closest spelling among keys of the same depth.
    leaf = key.rsplit(".", 1)[-1]
    match = [k for k in _all_keys() if "." in k and k.rsplit(".", 1)[-1] == leaf][:1]
    if not match:
        same_depth = [k for k in valid if k.count(".") == key.count(".")] or valid
        match = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.5)
    hint = f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown(prefix + str(k), [prefix + n for n in names])
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _convert(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """A validated ``Config`` from nested plain data (a parsed YAML file or a checkpoint's copy)."""
    cfg = _build(Config, data or {}, "")
    if cfg.train.output is None:
        cfg.train.output = default_output(cfg.model.name)
    validate(cfg)
    return cfg


def default_output(model_name: str) -> str:
    """The run directory of a config that names none: ``runs/<model.name>`` (a name's ``/`` and ``:`` as ``_``)."""
    return "runs/" + re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dicts/lists/str/numbers (tuples become lists), safe for YAML and ``weights_only``."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# What a config's YAML may build: a config is a few hundred values a few levels deep. Aliases
# let a few hundred bytes stand for billions of values (the "billion laughs"), which PyYAML
# shares but every later copy of the config (config_to_dict, a checkpoint) expands until memory
# runs out; deep nesting overflows PyYAML's recursive composer and every walk of the data after it.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, and documents too big or too deep.

    PyYAML keeps the last of two equal keys, so a second ``train:`` section silently
    replaced the first one, settings and all. Each value is measured as it is composed,
    aliases expanded (``MAX_YAML_VALUES`` values, ``MAX_YAML_DEPTH`` levels), before any
    Python object is built from it.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels), aliases expanded

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._measured:  # its own anchor, still being composed
                raise ConfigError(f"line {mark.line + 1}: an alias refers to the value that contains it; "
                                  "a config cannot be recursive")
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ConfigError(f"line {mark.line + 1}: values nested more than {MAX_YAML_DEPTH} levels deep; "
                              "a config needs a few")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        values = 1 + sum(self._measured[id(c)][0] for c in children)
        levels = 1 + max((self._measured[id(c)][1] for c in children), default=0)
        if values > MAX_YAML_VALUES:
            raise ConfigError(f"line {mark.line + 1}: this value holds more than {MAX_YAML_VALUES:,} values with "
                              "its aliases expanded; a config needs far fewer (write the values out)")
        if levels > MAX_YAML_DEPTH:
            raise ConfigError(f"line {mark.line + 1}: values nested more than {MAX_YAML_DEPTH} levels deep with "
                              "aliases expanded; a config needs a few")
        self._measured[id(node)] = (values, levels)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may repeat what it merges
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise ConfigError(f"duplicate key '{key}' at line {line} (first given at line {first[key]}); "
                                  "keep one of them")
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Plain data from YAML text (a SafeLoader).

    Raises:
        ConfigError: a key given twice in one mapping, a recursive alias, or a document of more
            than ``MAX_YAML_VALUES`` values or ``MAX_YAML_DEPTH`` levels, aliases expanded.
        yaml.YAMLError: text that is not YAML.
    """
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.1), got {item!r}")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, null and [lists] their natural types.
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except ConfigError as e:  # a key given twice inside a {mapping}
        raise ConfigError(f"--set {key.strip()}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def overridden_keys(overrides: list[str]) -> list[str]:
    """The dotted keys ``overrides`` name, in order (``optim.lr`` of ``optim.lr=0.1``)."""
    return [_parse_override(item)[0] for item in overrides]


def _set_key(data: dict, key: str, value: Any, valid: list[str]) -> None:
    if key not in valid:
        raise _unknown(key, valid)
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str], values: Optional[dict[str, Any]] = None) -> dict:
    """Apply dotted ``key=value`` overrides to nested plain data (validated later as a whole).

    Args:
        data: nested plain data (a parsed file or a checkpoint's config); not modified.
        overrides: ``key=value`` strings; each value is parsed as YAML (``1`` is a number, ``null`` is None).
            One naming ``train.amp`` also sets ``train.amp_on_cpu``, unless another one sets it
            (``config.IMPLIED_BY_OVERRIDE``).
        values: dotted key -> value, applied last and taken as they are, without YAML parsing: the
            tools pass paths this way, so that ``--output 2024`` is a folder and ``--data null`` one too.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    valid = _all_keys()
    named = []
    for item in overrides:
        key, value = _parse_override(item)
        _set_key(data, key, value, valid)
        named.append(key)
    for key, (implied, value) in IMPLIED_BY_OVERRIDE.items():
        if key in named and implied not in named:
            _set_key(data, implied, value, valid)
    for key, value in (values or {}).items():
        _set_key(data, key, value, valid)
    return data

