"""Introspection of the config schema: the sections, their keys, types and one-line docs.

The loader, `--help` and the README's config reference all read the schema through this module, so
there is one source of truth.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args, get_origin

from torchtitan_like.config.schema import JobConfig


@dataclass(frozen=True)
class Key:
    section: str  # dotted section path, e.g. "training" or "quantize.linear.float8"
    name: str
    type: Any
    default: Any
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal below each field of a dataclass (its one-line doc)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


@cache
def sections() -> dict[str, type]:
    """Dotted section path -> dataclass, for every section (nested ones included)."""
    out: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if is_section(tp):
                path = f"{prefix}{f.name}"
                out[path] = tp
                walk(tp, path + ".")

    walk(JobConfig, "")
    return out


@cache
def keys() -> dict[str, Key]:
    """Dotted key -> Key, for every leaf key of every section."""
    out: dict[str, Key] = {}
    for path, cls in sections().items():
        docs = field_docs(cls)
        hints = _hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if is_section(tp):
                continue
            k = Key(path, f.name, tp, getattr(defaults, f.name), docs.get(f.name, ""))
            out[k.dotted] = k
    return out


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    return get_args(tp) if get_origin(tp) is Literal else None


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for `X | None`."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    inner, optional = unwrap_optional(tp)
    choices = literal_choices(inner)
    if choices is not None:
        name = " | ".join(repr(c) for c in choices)
    elif get_origin(inner) is list:
        name = f"list[{type_name(get_args(inner)[0])}]"  # list[Literal[...]] names its choices
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name
