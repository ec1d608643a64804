"""Safe YAML loading that keeps the source position of every value.

Only plain YAML types are accepted (no python/* tags), duplicate keys are an error, and the size of
the document and the number of alias expansions are capped, so a hostile file cannot blow up memory.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import Location, SpecError

MAX_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_ALIASES = 64

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


def escape_pointer_token(token: str | int) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


class PositionedDoc:
    """A loaded YAML document plus a map from JSON pointer to source location."""

    def __init__(self, data: Any, locations: dict[str, Location], key_locations: dict[str, Location],
                 file: str):
        self.data = data
        self.locations = locations
        self.key_locations = key_locations
        self.file = file

    def locate_key(self, pointer: str) -> Location:
        """The location of the key that introduces `pointer` (for unknown-key errors)."""
        loc = self.key_locations.get(pointer)
        return Location(loc.file, loc.line, loc.col, pointer) if loc else self.locate(pointer)

    def locate(self, pointer: str) -> Location:
        """The location of `pointer`, or of its nearest ancestor that has one."""
        probe = pointer
        while True:
            if probe in self.locations:
                loc = self.locations[probe]
                return Location(loc.file, loc.line, loc.col, pointer)
            if not probe:
                return Location(self.file, 1, 1, pointer)
            probe = probe.rsplit("/", 1)[0]


def load_yaml(text: str, file: str) -> PositionedDoc:
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise SpecError(f"spec is larger than {MAX_BYTES} bytes", Location(file, 1, 1, ""))
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError(f"invalid YAML: {exc.problem or exc}", Location(file, line, col, "")) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. a control code
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise SpecError(f"invalid YAML: character {exc.character!r} is not allowed",
                        Location(file, line, col, "")) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(f"invalid YAML: {type(exc).__name__}", Location(file, 1, 1, "")) from None
    if len(nodes) != 1 or nodes[0] is None:
        what = "is empty" if not nodes or nodes[0] is None else f"holds {len(nodes)} documents"
        raise SpecError(f"spec {what}; expected exactly one YAML mapping", Location(file, 1, 1, ""))
    builder = _Builder(file)
    data = builder.build(nodes[0], "")
    return PositionedDoc(data, builder.locations, builder.key_locations, file)


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.locations: dict[str, Location] = {}
        self.key_locations: dict[str, Location] = {}
        self.seen: set[int] = set()
        self.visits = 0
        self.aliases = 0

    def _loc(self, node: yaml.Node, pointer: str) -> Location:
        return Location(self.file, node.start_mark.line + 1, node.start_mark.column + 1, pointer)

    def build(self, node: yaml.Node, pointer: str) -> Any:
        self.visits += 1
        if self.visits > MAX_NODES:
            raise SpecError(f"spec expands to more than {MAX_NODES} values", self._loc(node, pointer))
        if id(node) in self.seen and isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise SpecError(f"more than {MAX_ALIASES} alias expansions", self._loc(node, pointer))
        self.seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise SpecError(
                f"tag {node.tag!r} is not allowed; specs hold plain YAML values only",
                self._loc(node, pointer),
            )
        self.locations.setdefault(pointer, self._loc(node, pointer))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise SpecError("YAML merge keys ('<<') are not allowed; use `extends:`",
                                    self._loc(key_node, pointer))
                key = self.build(key_node, pointer + "/<key>")
                if not isinstance(key, str):
                    raise SpecError(f"mapping keys must be strings, got {key!r}", self._loc(key_node, pointer))
                child = f"{pointer}/{escape_pointer_token(key)}"
                if key in out:
                    raise SpecError(f"duplicate key {key!r}", self._loc(key_node, child))
                self.key_locations[child] = self._loc(key_node, child)
                out[key] = self.build(value_node, child)
            self.locations.pop(pointer + "/<key>", None)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, f"{pointer}/{i}") for i, item in enumerate(node.value)]
        constructor = yaml.SafeLoader.yaml_constructors[node.tag]
        return constructor(yaml.SafeLoader(""), node)
