"""LLVM IR building blocks shared by the numba intrinsics (engine/popcount_block.py,
engine/madd_block.py). Files listed in engine/jit.py's _INTRINSIC_FILES stamp the on-disk cache
of every kernel, since numba inlines the intrinsics into their callers."""
from llvmlite import ir

I32 = ir.IntType(32)


class CodegenHelpers:
    """What an intrinsic's codegen(context, builder, sig, args) needs again and again."""

    def __init__(self, context, builder, sig, args):
        self.context, self.builder, self.sig, self.args = context, builder, sig, args

    def data(self, index):
        """Pointer to the first element of array argument `index`."""
        return self.context.make_array(self.sig.args[index])(self.context, self.builder, self.args[index]).data

    def vector_at(self, pointer, offset, kind):
        """`pointer` advanced by `offset` elements, as a pointer to a `kind` vector."""
        return self.builder.bitcast(self.builder.gep(pointer, [offset]), kind.as_pointer())

    def splat(self, value, kind):
        """A `kind` vector holding `value` in every lane."""
        one = self.builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(I32, 0))
        return self.builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined),
                                           ir.Constant(ir.VectorType(I32, kind.count), [0] * kind.count))
