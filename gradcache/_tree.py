"""Nested inputs and representations: flatten them to tensor leaves and rebuild them.

A cached step must cut every input group into chunks and glue chunk representations back together
without knowing what a tensor is. This module walks the containers users actually pass -- mappings
(``dict``, Hugging Face ``BatchEncoding``), lists, tuples and named tuples, nested -- and treats as a
*tensor leaf* whatever the backend's ``is_leaf`` says is one. Anything else (``None``, an ``int``, a
string flag) is a *static leaf*: kept in the structure and handed unchanged to every chunk. It never
imports a framework and never looks inside a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IsLeaf = Callable[[Any], bool]


@dataclass(frozen=True)
class TreeSpec:
    """The shape of a nested structure with its tensor leaves taken out.

    ``kind`` is ``"leaf"`` (a tensor slot), ``"static"`` (a kept value), ``"mapping"``, ``"list"``,
    ``"tuple"`` or ``"namedtuple"``; ``children`` are the specs of the items and ``keys`` the mapping's
    keys (or the paths' labels for sequences).
    """

    kind: str
    node_type: type | None = None
    keys: tuple = ()
    children: tuple[TreeSpec, ...] = ()
    static: Any = None

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(child.num_leaves for child in self.children)


_LEAF = TreeSpec("leaf")


def flatten(tree: Any, is_leaf: IsLeaf) -> tuple[list, TreeSpec]:
    """Returns the tensor leaves of ``tree`` in a fixed order, and the spec to rebuild it."""
    leaves: list = []
    spec = _flatten(tree, is_leaf, leaves)
    return leaves, spec


def _flatten(node: Any, is_leaf: IsLeaf, leaves: list) -> TreeSpec:
    if is_leaf(node):
        leaves.append(node)
        return _LEAF
    if isinstance(node, Mapping):
        keys = tuple(node.keys())
        children = tuple(_flatten(node[k], is_leaf, leaves) for k in keys)
        return TreeSpec("mapping", type(node), keys, children)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        children = tuple(_flatten(v, is_leaf, leaves) for v in node)
        return TreeSpec("namedtuple", type(node), tuple(node._fields), children)
    if isinstance(node, (list, tuple)):
        children = tuple(_flatten(v, is_leaf, leaves) for v in node)
        kind = "list" if isinstance(node, list) else "tuple"
        return TreeSpec(kind, type(node), tuple(range(len(node))), children)
    return TreeSpec("static", static=node)


def unflatten(spec: TreeSpec, leaves: Sequence) -> Any:
    """Rebuilds the structure described by ``spec`` around ``leaves`` (inverse of :func:`flatten`)."""
    iterator = iter(leaves)
    tree = _unflatten(spec, iterator)
    if next(iterator, _SENTINEL) is not _SENTINEL:
        raise ValueError("more leaves than the structure has slots")
    return tree


_SENTINEL = object()


def _unflatten(spec: TreeSpec, leaves) -> Any:
    if spec.kind == "leaf":
        leaf = next(leaves, _SENTINEL)
        if leaf is _SENTINEL:
            raise ValueError("fewer leaves than the structure has slots")
        return leaf
    if spec.kind == "static":
        return spec.static
    values = [_unflatten(child, leaves) for child in spec.children]
    node_type: Any = spec.node_type   # a container node always records its type
    if spec.kind == "mapping":
        return _rebuild_mapping(node_type, dict(zip(spec.keys, values)))
    if spec.kind == "namedtuple":
        return node_type(*values)
    if spec.kind == "list":
        return list(values) if node_type is list else _rebuild_sequence(node_type, values)
    return tuple(values) if node_type is tuple else _rebuild_sequence(node_type, values)


def _rebuild_mapping(node_type: type, items: dict) -> Mapping:
    # A BatchEncoding or an OrderedDict subclass rebuilds from a dict; a ModelOutput-like dataclass
    # wants keywords. Whatever cannot be rebuilt degrades to a plain dict rather than failing the step.
    if node_type is dict:
        return items
    for build in (lambda: node_type(items), lambda: node_type(**items)):
        try:
            return build()
        except Exception:  # noqa: BLE001 - any constructor failure means "try the next way"
            continue
    return items


def _rebuild_sequence(node_type: type, values: list):
    try:
        return node_type(values)
    except Exception:  # noqa: BLE001
        return list(values)


def leaf_paths(spec: TreeSpec, prefix: str = "") -> list[str]:
    """Human-readable paths of the tensor leaves (``['input_ids', 'attention_mask']``), for errors."""
    if spec.kind == "leaf":
        return [prefix or "<tensor>"]
    if spec.kind == "static":
        return []
    paths: list[str] = []
    for key, child in zip(spec.keys, spec.children):
        if spec.kind in ("mapping", "namedtuple"):
            label = f"{prefix}.{key}" if prefix else str(key)
        else:
            label = f"{prefix}[{key}]"
        paths.extend(leaf_paths(child, label))
    return paths


def map_leaves(fn: Callable, tree: Any, is_leaf: IsLeaf) -> Any:
    """Applies ``fn`` to every tensor leaf, keeping the structure and the static leaves."""
    leaves, spec = flatten(tree, is_leaf)
    return unflatten(spec, [fn(leaf) for leaf in leaves])
