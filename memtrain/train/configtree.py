"""Dataclass config trees from TOML: strict loading, `--set a.b=value` overrides, field docs, TOML output.

Strict means: an unknown key, a wrong type or a bad value is a `ConfigError` whose one-line message names
the full dotted key, so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import tomllib
import types
import typing
from functools import cache
from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and the fix."""


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(map(_describe, options))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_describe(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool or tp is int:  # bool is a subclass of int: check exactly
        if type(value) is tp:
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a (nested) dict; defaults fill what `values` leaves out."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known in this section: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def read_toml(path, *, what: str, where: str) -> dict[str, Any]:
    """The table tree of the TOML file `path`; one-line ConfigError when it is missing (naming `where` the shipped
    files are) or malformed. `what` names the file in messages ("config file", "experiment preset")."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found (the files shipped are in {where})")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: tables merge key by key (recursively), every other value replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def read_composed(path, *, what: str, where: str, _seen: tuple = ()) -> dict[str, Any]:
    """The tree of the TOML file `path` on top of the file its top-level `base = "other.toml"` names (a path
    relative to `path`'s folder), recursively; ConfigError for a missing base or a cycle."""
    from pathlib import Path
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"{what} {path.name}: its base configs form a cycle ({chain})")
    tree = read_toml(path, what=what, where=where)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{what} {path}: base must be a file name such as \"demo.toml\", got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{what} {path}: its base {base!r} was not found (looked for {base_path})")
    return merge_trees(read_composed(base_path, what=what, where=where, _seen=(*_seen, path)), tree)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value); the value is read as TOML, else taken as a plain string, unless it
    plainly tried to be TOML (a list, table, quoted string or number that does not parse): a ConfigError."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set model.n_layers=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if not _meant_as_toml(raw):
            return key.split("."), raw  # a bare word or path (model.memory=mac, data.path=data_cache/x)
        # Column numbers count from the start of the value, not of the "v = " prefix parsed above.
        why = re.sub(r"at line 1, column (\d+)", lambda m: f"at character {int(m.group(1)) - 4}", str(e))
        raise ConfigError(f"--set {key}={raw}: not a valid TOML value ({why}); write TOML, e.g. 3, 1e-3, [0, -1] "
                          f"or a quoted string \"text\" (a bare word such as mac needs no quotes)") from None
    return key.split("."), value


# What a failed TOML value must look like to be an error rather than a plain string: the start of a list,
# table or quoted string, or a number-like token (1e, 0x, 1_, .5, +1e+).
_NUMBER_LIKE = re.compile(r"[+-]?(0[xob]\w*|[\d_]*\.?[\d_]*([eE][+-]?[\d_]*)?)")


def _meant_as_toml(raw: str) -> bool:
    raw = raw.strip()
    return raw[:1] in ("[", "{", '"', "'") or (bool(_NUMBER_LIKE.fullmatch(raw)) and any(c.isdigit() for c in raw))


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Apply one `--set` override to a nested dict in place."""
    path, value = parse_override(text)
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text!r}: '{part}' is a value, not a section")
    node[path[-1]] = value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal written right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(obj: Any, *, with_docs: bool = True) -> str:
    """Render a dataclass tree as TOML (scalars first, then one table per nested dataclass)."""
    lines: list[str] = []

    def emit(node: Any, table: str) -> None:
        docs = field_docs(type(node))
        nested = []
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f.name, value))
                continue
            if value is None:
                continue  # TOML has no null: an absent key means the default None
            if with_docs and f.name in docs:
                lines.append(f"# {docs[f.name].splitlines()[0]}")
            lines.append(f"{f.name} = {_toml_value(value)}")
        for name, value in nested:
            full = f"{table}.{name}" if table else name
            lines.append("")
            lines.append(f"[{full}]")
            emit(value, full)

    emit(obj, "")
    return "\n".join(lines).lstrip("\n") + "\n"
