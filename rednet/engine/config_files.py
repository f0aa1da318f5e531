"""Config files: strict YAML reading, ``base:`` merging, the bundled configs, and ``load_config``.

A config file is YAML (UTF-8, no key given twice) whose sections follow the schema of
``config``; it may name a ``base`` file whose sections it is merged over. The configs
bundled with the package live in the repository's top-level ``configs/`` and ship in a
wheel as ``rednet/configs/``; ``--config NAME`` finds them from any directory.
``load_config`` is the whole way in: file, base files, overrides, validated ``Config``.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError
from .config_data import apply_overrides, config_from_dict, load_yaml

__all__ = ["BUNDLED_CONFIG_DIR", "MAX_BASE_DEPTH", "bundled_configs", "load_config", "resolve_config_path"]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where the YAML is wrong and why (PyYAML's own message spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
        if e.context and e.context_mark is not None:
            text += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        return text
    return " ".join(str(e).split())



def _bundled_config_dir() -> Path:
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"  # a wheel: pyproject.toml maps the package rednet.configs to configs/
    return installed if installed.is_dir() else package.parent / "configs"  # a checkout (PYTHONPATH or editable)


# The configs shipped with the package, so that `--config rednet50` works from any directory and
# from an installed wheel, not only from the root of a checkout. Their one copy is the repository's
# top-level configs/, which a wheel holds as rednet/configs/.
BUNDLED_CONFIG_DIR = _bundled_config_dir()
_SUFFIXES = (".yaml", ".yml")


def _bundled(name: str) -> Optional[Path]:
    """The bundled config a name means (``rednet50``, ``rednet50.yaml``, ``configs/rednet50.yaml``), or None."""
    given = Path(name)
    if not name or given.name in ("", ".", "..") or (name != given.name and given.parts != ("configs", given.name)):
        return None  # a path in any other folder names a file of the user's, never a bundled one
    path = BUNDLED_CONFIG_DIR / (given.name if given.name.endswith(_SUFFIXES) else f"{given.name}.yaml")
    return path if path.is_file() else None


def bundled_configs() -> dict[str, str]:
    """Name -> description of each bundled config; the description is the file's first comment line."""
    found = {}
    # Natural order: rednet26 before rednet101.
    for path in sorted(BUNDLED_CONFIG_DIR.glob("*.yaml"), key=lambda p: [int(s) if s.isdigit() else s
                                                                       for s in re.split(r"(\d+)", p.stem)]):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "#")
        found[path.stem] = first.lstrip("#").strip()
    return found


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The config file ``path`` names: the path itself where it exists, else the bundled config of that name.

    ``rednet50``, ``rednet50.yaml`` and ``configs/rednet50.yaml`` (the file in a checkout) all
    name the bundled ``rednet50`` from any directory.

    Raises:
        ConfigError: empty, a folder, or neither an existing file nor a bundled name (the message lists those).
    """
    if str(path) == "":
        raise ConfigError("the config file name is empty")
    given = Path(path)
    if given.is_dir():
        raise ConfigError(f"config file {given} is a folder; give a YAML file")
    if given.is_file():
        return given
    bundled = _bundled(str(path))
    if bundled is not None:
        return bundled
    names = list(bundled_configs())
    if Path(str(path)).name != str(path):
        hint = f"; for the bundled one, give just its name: {given.stem}" if _bundled(given.name) else ""
        raise ConfigError(f"config file {given} does not exist{hint}")
    stem = given.stem if given.suffix in _SUFFIXES else str(path)
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config file {path} does not exist, nor is it a bundled config{hint} "
                      f"(bundled: {', '.join(names)})")


# A config file may name another as its base: its sections are merged over the base's,
# key by key, so a variant states only what differs from the recipe it builds on.
_BASE_KEY = "base"
# How many base files may stand below the file given, one on another: the bundled recipes use
# one; a longer chain is a mistake (or generated), and Python's recursion would end it anyway.
MAX_BASE_DEPTH = 32


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(out.get(k), dict) and (isinstance(v, dict) or v is None):
            out[k] = _merge(out[k], v or {})  # an empty section (``train:``) changes nothing
        else:
            out[k] = v
    return out


def _read_config_file(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """The sections of a YAML file merged over those of its ``base`` file (relative to it), recursively."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        # YAML files are UTF-8 whatever the locale says (a BOM is allowed).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at line {line}); "
                          "save it as UTF-8") from None
    try:
        data = load_yaml(text) or {}
    except ConfigError as e:  # a duplicate key
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: '{_BASE_KEY}' expects a file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file() and _bundled(base) is not None:
        base_path = _bundled(base)  # a user's file may build on a bundled recipe by name
    chain = (*including, path.resolve())
    if len(chain) > MAX_BASE_DEPTH:
        raise ConfigError(f"config file {chain[0]}: its base files nest more than {MAX_BASE_DEPTH} deep "
                          f"(base file {MAX_BASE_DEPTH}, {path}, names another: {base}); merge some of them")
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"config file {path}: the base files form a cycle: {cycle}")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base file {base_path} does not exist")
    return _merge(_read_config_file(base_path, chain), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                values: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply ``overrides``, validate.

    Args:
        path: a YAML file with ``model``/``data``/``optim``/``train`` sections and optionally
            ``base: FILE``, a config (path relative to this file, or a bundled config's name)
            whose sections this one's are merged over (at most ``MAX_BASE_DEPTH`` base files
            one on another); or the name of a bundled config
            (``rednet50`` or ``rednet50.yaml``, see ``bundled_configs``). A path that exists wins.
        overrides: dotted ``key=value`` strings, e.g. ``["optim.lr=0.1", "data.batch_size=64"]``.
        values: dotted key -> value applied last, as given (no YAML parsing), e.g. paths from the command line.
    """
    data: dict = {}
    if path is not None:
        data = _read_config_file(resolve_config_path(path))
    return config_from_dict(apply_overrides(data, overrides or [], values))
