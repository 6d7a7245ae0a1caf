"""TF2's object graph (``TrackableObjectGraph``), the ``_CHECKPOINTABLE_OBJECT_GRAPH`` entry.

Fields (``tensorflow/core/protobuf/trackable_object_graph.proto``): nodes 1; a node's
children 1 (node_id 1, local_name 2), attributes 2 (name 1, full_name 2, checkpoint_key 3),
slot_variables 3 (original_variable_node_id 1, slot_name 2, slot_variable_node_id 3).
Node ids are checked against the node count; paths are found breadth-first, no recursion.

>>> from .proto import field_bytes, field_varint
>>> attr = field_bytes(2, field_bytes(1, b"VARIABLE_VALUE") + field_bytes(2, b"w")
...                    + field_bytes(3, b"v/.ATTRIBUTES/VARIABLE_VALUE"))
>>> root = field_bytes(1, field_varint(1, 1) + field_bytes(2, b"v"))
>>> graph = parse_object_graph(field_bytes(1, root) + field_bytes(1, attr), "example")
>>> graph.paths()
{0: '', 1: 'v'}
>>> graph.full_names()
{'v/.ATTRIBUTES/VARIABLE_VALUE': 'w'}
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from . import proto
from .errors import CheckpointError

KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclass
class Attribute:
    """A tensor an object saved: ``name`` (``VARIABLE_VALUE``...), the TF1-style
    ``full_name`` (``dense/kernel``; an EMA's average: ``<var>/ExponentialMovingAverage``)
    and the bundle key it is stored under."""
    name: str
    full_name: str
    checkpoint_key: str


@dataclass
class SlotVariable:
    """An optimizer slot: ``slot_variable_node_id`` holds ``slot_name`` of the variable
    ``original_variable_node_id``; both ids index :attr:`ObjectGraph.nodes`."""
    original_variable_node_id: int
    slot_name: str
    slot_variable_node_id: int


@dataclass
class TrackableNode:
    children: List[Tuple[int, str]] = field(default_factory=list)
    attributes: List[Attribute] = field(default_factory=list)
    slot_variables: List[SlotVariable] = field(default_factory=list)


@dataclass
class ObjectGraph:
    """The decoded object graph; node 0 is the root (the ``tf.train.Checkpoint``)."""
    nodes: List[TrackableNode]

    def paths(self) -> Dict[int, str]:
        """Each reachable node's path from the root, '/'-joined local names (shortest)."""
        found = {0: ""} if self.nodes else {}
        queue = deque(found)
        while queue:
            node = queue.popleft()
            for child, name in self.nodes[node].children:
                if child not in found:
                    found[child] = f"{found[node]}/{name}" if found[node] else name
                    queue.append(child)
        return found

    def full_names(self) -> Dict[str, str]:
        """Bundle key -> the TF1-style full name of each attribute."""
        return {a.checkpoint_key: a.full_name for node in self.nodes for a in node.attributes}


def _node_id(value, count: int, what: str) -> int:
    if isinstance(value, memoryview) or not 0 <= value < count:
        raise CheckpointError(f"{what}: a reference to node {value} of {count}")
    return value


def parse_object_graph(buf, what: str) -> ObjectGraph:
    """Decode a serialized ``TrackableObjectGraph``; a malformed one is a CheckpointError."""
    raw_nodes = proto.parse(buf, what).get(1, [])
    count = len(raw_nodes)
    nodes = []
    for raw in raw_nodes:
        if not isinstance(raw, memoryview):
            raise CheckpointError(f"{what}: a malformed node")
        fields = proto.parse(raw, what)
        node = TrackableNode()
        for number, values in fields.items():
            if number in (1, 2, 3) and not all(isinstance(v, memoryview) for v in values):
                raise CheckpointError(f"{what}: a malformed node field {number}")
        for child in fields.get(1, []):
            sub = proto.parse(child, what)
            node.children.append((_node_id(proto.last(sub, 1), count, what),
                                  proto.text(proto.last(sub, 2, b""), what)))
        for attribute in fields.get(2, []):
            sub = proto.parse(attribute, what)
            node.attributes.append(Attribute(*(proto.text(proto.last(sub, i, b""), what)
                                               for i in (1, 2, 3))))
        for slot in fields.get(3, []):
            sub = proto.parse(slot, what)
            node.slot_variables.append(SlotVariable(
                _node_id(proto.last(sub, 1), count, what),
                proto.text(proto.last(sub, 2, b""), what),
                _node_id(proto.last(sub, 3), count, what)))
        nodes.append(node)
    return ObjectGraph(nodes)
