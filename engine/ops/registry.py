"""The op registry: op name -> shape rule, plain-numpy reference, fast kernel and cost.

Every op module registers itself once with `register`; `engine/ops/__init__.py` imports the op
modules explicitly, so `git grep register(` lists every op.
"""
from dataclasses import dataclass
from typing import Callable

from ..errors import GraphError


@dataclass(frozen=True)
class Cost:
    """Operation counts of one node for one sample.

    flops: float operations actually executed; bops: binary operations (M*N*MACs for a PA
    layer); float_flops: what the same layer costs in float32 (2*MACs for a conv), the
    baseline the savings are measured against; float32_params: parameter count of the
    float32 layer it replaces; int_macs: 8-bit integer multiply-accumulates (an IntConv's
    convolution), counted as two operations each, like a float MAC (engine/report.py).
    """

    flops: int = 0
    bops: int = 0
    int_macs: int = 0
    float_flops: int = 0
    float32_params: int = 0


@dataclass(frozen=True)
class Op:
    """One op.

    infer_shapes(node, input_shapes) -> output_shapes; validates attributes and parameters and
        raises GraphError naming the node. Shapes are tuples whose first entry (batch) is None.
    reference(node, inputs) -> outputs; plain numpy in float64, the oracle.
    make_kernel(node) -> run(inputs) -> outputs; the fast float32 path. Whatever can be computed
        once per node (packed constants, combine coefficients) is computed in make_kernel.
    cost(node, input_shapes, output_shapes) -> Cost for one sample.
    output_buffer: the kernel's run also takes `out=`, a preallocated C-contiguous float32 array
        of its (single) output's shape, and writes the output there (engine/memory.py).
    uses_blas: the kernel calls numpy's BLAS (matmul); `Session.run` holds the BLAS to one thread
        while a plan with such an op runs, and leaves it alone otherwise.
    attributes, parameters: the attribute and parameter names a stored graph (a .pab file) may
        hold for this op; `check_stored_node` refuses any other in a file.
    plan_only: the op exists only in a Session's plan (engine/plan.py): its nodes are PlanNodes
        whose typed `config` the lowering made; a stored graph never holds it.
    output_memory(node) -> one of "buffer", "own", "view" per output: written into a planned
        float32 buffer (the `out=` of output_buffer), a new array of its own each run (bit-planes),
        or possibly a view of the inputs (engine/memory.py). Default: "buffer" for an op with an
        output_buffer, else "view".
    keeps_state: the kernel's run also takes `state=`, a dict that a Session keeps for this node per
        Python thread, plan and batch size (engine/session.py: _bound_kernel): the kernel may keep
        its "own" outputs there and write them again in the next run (they are plan-internal
        tensors, read only within the run that wrote them), and what it prepared for its last call.
    scratch_bytes(node, input_shapes, output_shapes) -> the bytes per sample the kernel allocates
        beside its outputs (a padded copy of the input, im2col columns); default 0. Session's memory
        estimate adds it at the node (engine/session.py: bytes_per_sample).
    """

    name: str
    summary: str
    infer_shapes: Callable
    reference: Callable
    make_kernel: Callable
    cost: Callable
    output_buffer: bool = False
    uses_blas: bool = False
    attributes: tuple = ()
    parameters: tuple = ()
    plan_only: bool = False
    output_memory: Callable = None
    scratch_bytes: Callable = None
    keeps_state: bool = False

    def memory_kinds(self, node):
        """`output_memory` of `node` (see above), one entry per output."""
        if self.output_memory is not None:
            return tuple(self.output_memory(node))
        return ("buffer" if self.output_buffer else "view",) * len(node.outputs)

    def scratch(self, node, input_shapes, output_shapes):
        """`scratch_bytes` of `node` (0 when the op declares none)."""
        return 0 if self.scratch_bytes is None else self.scratch_bytes(node, input_shapes, output_shapes)


def kept(state, key, arguments, make):
    """make(), or with a step's `state` (Op.keeps_state) what make() gave under `key` for the last
    run with the same `arguments` (an array made there is written again by every run)."""
    if state is None:
        return make()
    made = state.get(key)
    if made is None or made[0] != arguments:
        made = state[key] = (arguments, make())
    return made[1]


_OPS = {}


def register(op):
    if op.name in _OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    _OPS[op.name] = op
    return op


def get_op(name, node_name="?"):
    """The registered op `name`; an unknown name raises GraphError naming the node."""
    try:
        return _OPS[name]
    except KeyError:
        raise GraphError(
            f"node {node_name!r}: unknown op {name!r}; supported ops: {', '.join(sorted(_OPS))}"
        ) from None


def check_stored_node(node):
    """Raise GraphError naming the node unless every attribute and parameter of `node` is one its
    op declares a stored graph may hold (plan-only state never comes from a file)."""
    op = get_op(node.op, node.name)
    if op.plan_only:
        raise GraphError(f"node {node.name!r}: op {node.op!r} exists only in a Session's plan; a stored graph may "
                         f"not hold it")
    for kind, present, allowed in (("attribute", node.attrs, op.attributes), ("parameter", node.params, op.parameters)):
        unexpected = sorted(set(present) - set(allowed))
        if unexpected:
            raise GraphError(f"node {node.name!r} ({node.op}): {kind} {unexpected[0]!r} is not one a stored "
                             f"{node.op} may hold; expected {kind}s: {', '.join(allowed) or 'none'}")


def registered_ops():
    """All registered ops, sorted by name."""
    return [_OPS[name] for name in sorted(_OPS)]
