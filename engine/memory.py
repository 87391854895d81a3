"""Liveness-based buffer plan: which intermediate tensors share which preallocated buffers.

A tensor produced by an op that writes into a given output buffer (`Op.output_buffer`) gets a
slot, unless the node writes its reader's bit-planes instead (engine/fusion.py:
hand_off_planes); slots are reused once every tensor that may alias them has been read for the
last time.
Any other op's output is assumed to be a view of its inputs (Flatten, Reshape, Slice and
Transpose return views), so it keeps its inputs' slots alive. Graph inputs and outputs and
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
        writes_buffer = get_op(node.op, node.name).output_buffer
        for position, name in enumerate(node.outputs):
            # bit-planes in a new array of the node's own (engine/fusion.py): its only output, or
            # the second one after its float32 output
            if "output_planes" in node.attrs and position == len(node.outputs) - 1:
                owners[name] = set()
            elif writes_buffer:
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
