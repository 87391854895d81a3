"""Liveness-based buffer plan: which intermediate tensors share which preallocated buffers.

What each output is, the op says (`Op.memory_kinds`): written into a given float32 buffer
("buffer": it gets a slot; slots are reused once every tensor that may alias them has been read
for the last time), a new array of its own each run ("own": bit-planes), or possibly a view of
its inputs ("view": Flatten, Reshape, Slice and Transpose return views), which keeps its inputs'
slots alive. Graph inputs and outputs and
requested tensors get no slot; `Session.run` copies a returned array that is a view into a
buffer, so what it returns never changes in a later run.
"""
from dataclasses import dataclass

from .ops import _attrs, get_op


@dataclass
class BufferPlan:
    """slot_of: {tensor name: slot index}; slot_elements: elements per sample of each slot."""

    slot_of: dict
    slot_elements: list

    def bytes_per_sample(self):
        """Float32 bytes per sample of all the slots together (the planned working memory)."""
        return 4 * sum(self.slot_elements)


def plan_buffers(graph, shapes, keep=()):
    """The buffer plan of `graph` (in node order) for the tensors that can be planned."""
    protected = set(keep) | set(graph.outputs) | {info.name for info in graph.inputs}
    owners = {}  # tensor -> planned tensors whose buffer it may be (a view of)
    last_use = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            last_use[name] = index
        for name, kind in zip(node.outputs, get_op(node.op, node.name).memory_kinds(node)):
            if kind == "own":
                owners[name] = set()
            elif kind == "buffer":
                owners[name] = {name}
            else:
                owners[name] = set().union(*(owners.get(source, set()) for source in node.inputs))
    end = {}
    for name, roots in owners.items():
        for root in roots:
            end[root] = max(end.get(root, -1), last_use.get(name, len(graph.nodes)))
    slot_of, slot_elements, free = {}, [], []
    releases = {}  # node index -> slots free after it
    for index, node in enumerate(graph.nodes):
        for name in node.outputs:
            if name not in end or name in protected:
                continue
            need = _attrs.sample_elements(shapes[name])
            fitting = [slot for slot in free if slot_elements[slot] >= need]
            if fitting:
                slot = min(fitting, key=lambda s: slot_elements[s])
            elif free:
                slot = max(free, key=lambda s: slot_elements[s])
                slot_elements[slot] = need
            else:
                slot = len(slot_elements)
                slot_elements.append(need)
            if slot in free:
                free.remove(slot)
            slot_of[name] = slot
            releases.setdefault(end[name], []).append(slot)
        free.extend(releases.pop(index, []))
    return BufferPlan(slot_of, slot_elements)
