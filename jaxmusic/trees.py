"""Nested dicts of arrays (parameter trees as pure dicts) <-> flat `{path tuple: leaf}` dicts."""

from __future__ import annotations

from typing import Any, Mapping

Path = tuple[str, ...]


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Nested dict -> `{path tuple: leaf}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update({(key,) + p: v for p, v in flatten(value).items()})
        else:
            out[(key,)] = value
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """`{path tuple: leaf}` -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
