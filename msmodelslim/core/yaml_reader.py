"""YAML documents read safely: duplicate keys refused, and the nesting depth and alias-expanded size bounded before
any Python object is built. Real configs have a few hundred nodes and ~10 levels; the bounds stop alias bombs
("billion laughs") and deep nesting before they cost memory, time or a RecursionError."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from msmodelslim.core.errors import ConfigError

MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 100


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silent override is almost always a mistake)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    # Only keys written in this mapping count; keys merged in with `<<: *anchor` may be overridden.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _nesting_depth(text: str) -> int:
    """The deepest literal nesting of collections, from the parser's events (the parser is iterative; the
    composer that builds nodes recurses once per level, so this runs first)."""
    depth = deepest = 0
    for event in yaml.parse(text, Loader=_UniqueKeyLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def _check_node_graph(root: yaml.Node, source: str) -> None:
    """Refuse a node graph whose alias-expanded size exceeds MAX_EXPANDED_NODES or whose expanded depth exceeds
    MAX_DEPTH, before any Python object is built. Sizes are memoized by node identity, so a billion-laughs
    document costs one visit per distinct node; an alias to an enclosing node (a cycle) is refused too."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if finished:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            if size[key] > MAX_EXPANDED_NODES:
                how = "has" if len(size) > MAX_EXPANDED_NODES else "expands through aliases (*name) to"
                raise ConfigError(f"{source}: the document {how} more than {MAX_EXPANDED_NODES} nodes; a modelslim "
                                  f"config is far smaller (remove the repeated aliases)")
            if height[key] > MAX_DEPTH:
                raise ConfigError(f"{source}: the document is nested more than {MAX_DEPTH} levels (counting aliases); "
                                  f"a modelslim config is far shallower")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: an alias (*name) refers to a collection that contains it; the document "
                              f"would be infinite")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children) if id(c) not in size)


def _load_yaml(text: str, source: str) -> Any:
    """yaml.load with _UniqueKeyLoader, bounded: depth and alias-expanded size are checked before construction."""
    if _nesting_depth(text) > MAX_DEPTH:
        raise ConfigError(f"{source}: the document is nested more than {MAX_DEPTH} levels; a modelslim config is "
                          f"far shallower")
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node_graph(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_file(path: Path, missing: str, where: str) -> Any:
    """A YAML file read with the bounded loader; every way it can be unreadable is a ConfigError: `missing` when
    it is not a file, `where: <what is wrong>` otherwise."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return _load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a UTF-8 text file") from None
    except RecursionError:  # a backstop: the depth checks in _load_yaml come first
        raise ConfigError(f"{where}: the document is nested more than {MAX_DEPTH} levels") from None
