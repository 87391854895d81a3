"""LLVM IR building blocks shared by the numba intrinsics (engine/popcount_block.py,
engine/ops/conv_direct.py, engine/ops/int_conv_direct.py). Files listed in engine/jit.py's _INLINED_FILES stamp the on-disk cache
of every kernel, since numba inlines the intrinsics into their callers."""
from llvmlite import ir
from numba.core import cgutils

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

    def load_lanes(self, pointer, kind, count):
        """A `kind` vector of the `count` (an i64 <= its lane count) elements at `pointer` (its element
        type's pointer), zeros after them: one vector load when all lanes are there, else element by
        element (what follows in memory may not be readable)."""
        builder = self.builder
        i64 = ir.IntType(64)
        lanes = kind.count
        slot = cgutils.alloca_once(builder, kind)
        with builder.if_else(builder.icmp_signed("==", count, ir.Constant(i64, lanes))) as (whole, partial):
            with whole:
                builder.store(builder.load(builder.bitcast(pointer, kind.as_pointer()), align=4), slot)
            with partial:
                builder.store(ir.Constant(kind, None), slot)
                elements = builder.bitcast(slot, kind.element.as_pointer())
                for lane in range(lanes):
                    with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, lane), count)):
                        builder.store(builder.load(builder.gep(pointer, [ir.Constant(i64, lane)])),
                                      builder.gep(elements, [ir.Constant(i64, lane)]))
        return builder.load(slot)

    def store_lanes(self, name, pointer, value, last_lanes):
        """Store vector `value` at `pointer` (its element type's pointer): whole when `last_lanes` (an
        i64) is its lane count, else only its first `last_lanes` lanes, one by one (the end of a row:
        what follows in memory is not the row's)."""
        builder = self.builder
        i64 = ir.IntType(64)
        lanes = value.type.count
        whole = builder.append_basic_block(f"{name}.whole")
        partial = builder.append_basic_block(f"{name}.partial")
        joined = builder.append_basic_block(f"{name}.stored")
        builder.cbranch(builder.icmp_signed("==", last_lanes, ir.Constant(i64, lanes)), whole, partial)
        builder.position_at_end(whole)
        builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=4)
        builder.branch(joined)
        builder.position_at_end(partial)
        for lane in range(lanes - 1):
            lane_store = builder.append_basic_block(f"{name}.lane{lane}")
            builder.cbranch(builder.icmp_signed("<", ir.Constant(i64, lane), last_lanes), lane_store, joined)
            builder.position_at_end(lane_store)
            builder.store(builder.extract_element(value, ir.Constant(I32, lane)),
                          builder.gep(pointer, [ir.Constant(i64, lane)]), align=4)
        builder.branch(joined)
        builder.position_at_end(joined)

    def rows_by_vectors(self, name, vectors, max_vectors, length, starts, step, store_row, present_rows):
        """The register-blocked loop of the direct convolutions (engine/ops/conv_direct.py,
        engine/ops/int_conv_direct.py). A switch on `vectors` (an i64 in 1..max_vectors) picks the code
        made for that many vectors per row; it runs `for t in range(length)` (length: an i64 >= 1)
        carrying len(starts) rows x `vectors` accumulators, row r's starting at starts[r] (values of the
        entry block); step(t, count, accumulators) emits one iteration and returns the updated
        [row][vector] values; after the loop, store_row(count, r, values) emits the stores of each row
        r < present_rows (an i64 >= 1: row 0 always). The builder is left after all of it."""
        builder = self.builder
        i64 = ir.IntType(64)
        entry = builder.block
        exit_block = builder.append_basic_block(f"{name}.exit")
        switch = builder.switch(vectors, exit_block)
        for count in range(1, max_vectors + 1):
            loop = builder.append_basic_block(f"{name}.loop{count}")
            switch.add_case(ir.Constant(i64, count), loop)
            builder.position_at_end(loop)
            t = builder.phi(i64)
            t.add_incoming(ir.Constant(i64, 0), entry)
            accumulators = []
            for start in starts:
                row = []
                for _ in range(count):
                    accumulator = builder.phi(start.type)
                    accumulator.add_incoming(start, entry)
                    row.append(accumulator)
                accumulators.append(row)
            updated = step(t, count, accumulators)
            next_t = builder.add(t, ir.Constant(i64, 1))
            body_end = builder.block
            t.add_incoming(next_t, body_end)
            for row, values in zip(accumulators, updated):
                for accumulator, value in zip(row, values):
                    accumulator.add_incoming(value, body_end)
            store = builder.append_basic_block(f"{name}.store{count}")
            builder.cbranch(builder.icmp_signed("<", next_t, length), loop, store)
            builder.position_at_end(store)
            for r, values in enumerate(updated):
                if r:
                    present = builder.append_basic_block(f"{name}.row{count}.{r}")
                    builder.cbranch(builder.icmp_signed("<", ir.Constant(i64, r), present_rows), present, exit_block)
                    builder.position_at_end(present)
                store_row(count, r, values)
            builder.branch(exit_block)
        builder.position_at_end(exit_block)
