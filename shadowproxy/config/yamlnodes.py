"""A thin typed view over PyYAML's node tree so every value knows its line.

``config/load.py`` walks these nodes; any error it raises names file:line and the key path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from shadowproxy.base.errors import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML node with its source position and dotted key path (``routes[0].primary``)."""

    node: yaml.Node
    file: str
    key: str

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, path=self.file, line=self.line, key=self.key)

    def describe(self) -> str:
        if isinstance(self.node, yaml.ScalarNode):
            return repr(self.node.value)
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        return "a list"

    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == _NULL_TAG

    # Scalars -----------------------------------------------------------------
    def as_str(self) -> str:
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag not in (
            _STR_TAG,
            _INT_TAG,
            _FLOAT_TAG,
        ):
            raise self.error(f"expected a string, got {self.describe()}")
        return str(self.node.value)

    def as_bool(self) -> bool:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag == _BOOL_TAG:
            return self.node.value.lower() in ("true", "yes", "on")
        raise self.error(f"expected true or false, got {self.describe()}")

    def as_int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        if not (isinstance(self.node, yaml.ScalarNode) and self.node.tag == _INT_TAG):
            raise self.error(f"expected a whole number, got {self.describe()}")
        value = int(yaml.safe_load(self.node.value))
        self._check_range(value, minimum, maximum)
        return value

    def as_float(self, minimum: float | None = None, maximum: float | None = None) -> float:
        if not (isinstance(self.node, yaml.ScalarNode) and self.node.tag in (_INT_TAG, _FLOAT_TAG)):
            raise self.error(f"expected a number, got {self.describe()}")
        value = float(yaml.safe_load(self.node.value))
        if value != value:  # NaN
            raise self.error("expected a number, got NaN")
        self._check_range(value, minimum, maximum)
        return value

    def _check_range(self, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be at most {maximum}, got {value}")

    # Collections -------------------------------------------------------------
    def items(self, allowed: frozenset[str] | None = None) -> dict[str, Node]:
        """The mapping's entries by key; unknown keys (when ``allowed`` is given) are errors."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.describe()}")
        out: dict[str, Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise Node(key_node, self.file, self.key).error("keys must be plain strings")
            name = str(key_node.value)
            child_key = f"{self.key}.{name}" if self.key else name
            if name in out:
                raise Node(key_node, self.file, child_key).error("duplicate key")
            if allowed is not None and name not in allowed:
                expected = ", ".join(sorted(allowed))
                raise Node(key_node, self.file, child_key).error(
                    f"unknown key (expected one of: {expected})"
                )
            out[name] = Node(value_node, self.file, child_key)
        return out

    def elements(self) -> Iterator[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {self.describe()}")
        for index, child in enumerate(self.node.value):
            yield Node(child, self.file, f"{self.key}[{index}]")

    def str_list(self) -> tuple[str, ...]:
        return tuple(element.as_str() for element in self.elements())


def compose(text: str, file: str) -> Node | None:
    """Parse YAML text into a Node tree; syntax errors become ConfigError with the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc}", path=file, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=file) from exc
    return None if root is None else Node(root, file, "")
