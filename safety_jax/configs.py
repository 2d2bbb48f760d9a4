"""The one YAML reader of the project's configs: YAML with ``1e-4`` read as a float, ``key=value`` overrides, and
errors that name the file, the line and the key.

    data = read_yaml("sweep.yaml")                  # a YamlDict: a dict that knows each key's line
    apply_overrides(data, ["train.lr=3e-4", "seeds=[0, 1]"])
    spec = build(SweepSpec, data, "sweep.yaml")     # unknown keys -> ConfigError naming file, line and key
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from safety_jax.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 with ``1e-4`` read as a float (plain PyYAML wants ``1.0e-4`` and reads ``1e-4`` as a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class YamlDict(dict):
    """A mapping read from a file: ``where(key)`` says "FILE, line N" for its keys (nested ones included)."""

    def __init__(self, data: dict, path: str = "<overrides>", lines: dict[str, int] | None = None,
                 prefix: str = "") -> None:
        super().__init__(data)
        self.path, self.lines, self.prefix = path, dict(lines or {}), prefix

    def where(self, key: str) -> str:
        dotted = f"{self.prefix}{key}"
        line = self.lines.get(dotted)
        return f"{self.path}, line {line}" if line else self.path

    def child(self, key: str) -> YamlDict:
        """The mapping under ``key`` as a YamlDict that keeps the file's line numbers."""
        value = self.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: {self.prefix}{key} must be a mapping, got {value!r}")
        return YamlDict(value, self.path, self.lines, f"{self.prefix}{key}.")


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)


def read_yaml(path: str) -> YamlDict:
    """The mapping in ``path``; malformed YAML or a non-mapping raises ConfigError naming the file and line."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read it ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=YamlLoader)
        data = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        raise ConfigError(f"config {where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the file must hold a mapping of keys, got {type(data).__name__}")
    lines: dict[str, int] = {}
    if node is not None:
        _key_lines(node, "", lines)
    return YamlDict(data, path, lines)


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (numbers, ``1e-4``, lists, mappings, null)."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"override value {text!r} is not valid YAML ({e})") from None


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted="a.b"``, creating missing (or null) sections; a parent that holds a
    value other than a mapping is an error."""
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        if tree.get(p) is None:
            tree[p] = {}
        if not isinstance(tree[p], dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i + 1])} is {tree[p]!r}, not a section")
        tree = tree[p]
    tree[parts[-1]] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to ``data`` in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), parse_value(value))
    return data


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (``Spec`` or ``Spec | None``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def build(cls: type, data: Any, where: str = "config") -> Any:
    """``cls(**data)`` for a dataclass, building the fields typed as dataclasses (or ``dict[str, dataclass]``) from
    their mappings. An unknown key raises ConfigError naming the file and line (when ``data`` came from
    :func:`read_yaml`), the dotted key and the known keys; ``where`` names the source otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a mapping of keys, got {data!r}")
    located = data if isinstance(data, YamlDict) else YamlDict(data, where)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{located.where(k)}: unknown key '{located.prefix}{k}' in {cls.__name__}; known: "
                          f"{', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = _dataclass_in(hint)
        if sub is not None and (value is not None or dataclasses.is_dataclass(hint)):
            value = build(sub, located.child(key), where)  # a bare ``section:`` (null) is the defaults
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            section = located.child(key)
            value = {str(k): build(typing.get_args(hint)[1], section.child(k), where) for k in section}
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {cls.__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------- field checks
def invalid(field: str, value: Any, want: str) -> None:
    """Raise the ConfigError of a bad field: ``config FIELD=VALUE: what it should be``."""
    raise ConfigError(f"config {field}={value!r}: {want}")


def check_whole(field: str, value: Any, low: int = 1) -> None:
    """``value`` must be an int (not a bool) ≥ ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        invalid(field, value, f"a whole number ≥ {low}")


def check_positive(field: str, value: Any) -> None:
    """``value`` must be a number (not a bool) > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        invalid(field, value, "a positive number")
