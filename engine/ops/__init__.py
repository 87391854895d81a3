"""The op registry and the op modules, imported explicitly so that each registers itself once."""
from .registry import Cost, Op, get_op, registered_ops
from . import channel_affine, conv, elementwise, gemm, pa_conv, pool  # noqa: F401  (each registers its ops)
from . import activations, binary_elementwise, conv_transpose, matmul, pad, reduce, resize, shape_ops  # noqa: F401
from . import dynamic_conv, int_conv, lrn, staircase  # noqa: F401
from . import amx_conv, binary_conv, conv_max_pool, elementwise_chain, pack_planes  # noqa: F401  (plan-only: engine/plan.py)

__all__ = ["Cost", "Op", "get_op", "registered_ops"]
