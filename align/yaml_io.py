"""Reading YAML that a person wrote: config files, recipes, a run's `config.yaml`.

`yaml.safe_load` accepts two things that are never what the writer meant:
- a duplicate key (two `train:` sections): the second silently replaces the first; here it is an
  error naming the lines of both;
- aliases that expand to an enormous document ("billion laughs": a few hundred bytes of `&a` /
  `*a` that a reader walking the result, `from_dict`, `deepcopy`, `yaml.dump`, expands to
  gigabytes). PyYAML builds such a document as a small graph of shared nodes, so it loads fast and
  the blow-up comes later, somewhere else. Here the composed graph's expanded size is counted
  before anything is constructed (memoised, so counting costs the graph's size, not the
  expansion's), and a document that would expand past `MAX_NODES` nodes, or refers to itself, is
  refused.
Errors are one-line `ConfigError`s naming the file (and line). Imports nothing of align but errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from align.errors import ConfigError

MAX_NODES = 100_000
"""The most nodes (scalars, lists, mappings; aliases counted as what they expand to) a document
may hold. The largest config align ships has a few hundred."""
MAX_DEPTH = 100
"""The deepest nesting of lists and mappings a document may have (align's configs nest 3 deep)."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate mapping keys, naming both lines, and nesting past
    `MAX_DEPTH` (PyYAML composes recursively: a deep enough document is a RecursionError)."""

    where: str = "<string>"
    depth: int = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where}:{line}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *base` merges may be overridden; complex keys are refused by SafeLoader
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # unhashable: SafeLoader reports it below
                continue
            if first != line:
                raise ConfigError(f"{self.where}:{line}: duplicate key '{key}' (first at line {first}); the second "
                                  "would silently replace the first: merge them into one")
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: yaml.Node, limit: int = MAX_NODES) -> int:
    """Nodes of the document `root` once every alias is expanded, counted without expanding (each
    shared node's size is computed once). Raises ValueError past `limit`, or on a node that
    contains itself (`&a [*a]`)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > limit:
                raise ValueError(f"expands to more than {limit:,} nodes (YAML aliases)")
            continue
        if key in sizes:
            continue
        if key in on_path:  # started, not finished: an ancestor of itself
            raise ValueError("an alias refers to a node that contains it (a recursive YAML document)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, where: str = "<string>") -> Any:
    """Parse one YAML document strictly (see the module docstring); errors name `where`."""
    loader = StrictLoader(text)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            expanded_size(node)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in the file `path` (None when empty); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return load_yaml(text, str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file: a YAML mapping (an empty file is an empty one). What `config.read_yaml` does."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data
