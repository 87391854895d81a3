"""LLVM IR building blocks shared by the numba intrinsics (engine/popcount_block.py,
engine/ops/conv_direct.py, engine/ops/int_conv_direct.py). Files listed in engine/jit.py's _INTRINSIC_FILES stamp the on-disk cache
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

    def counted_loop(self, name, count, zeros, body):
        """Emit `for t in range(count)` (count: an i64 value >= 1) carrying one accumulator per
        constant of `zeros` (their start values); body(t, accumulators) emits one iteration and
        returns the accumulators' new values. The builder is left after the loop, and the values
        after the last iteration are returned."""
        builder = self.builder
        i64 = ir.IntType(64)
        entry = builder.block
        loop = builder.append_basic_block(f"{name}.loop")
        done = builder.append_basic_block(f"{name}.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        accumulators = []
        for zero in zeros:
            accumulator = builder.phi(zero.type)
            accumulator.add_incoming(zero, entry)
            accumulators.append(accumulator)
        updated = body(t, accumulators)
        next_t = builder.add(t, ir.Constant(i64, 1))
        for accumulator, value in zip(accumulators, updated):
            accumulator.add_incoming(value, builder.block)
        t.add_incoming(next_t, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_t, count), loop, done)
        builder.position_at_end(done)
        return updated
