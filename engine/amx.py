"""Intel AMX tiles: whether this process may use them, and AmxConv's micro-kernels
(engine/ops/amx_conv.py), written in LLVM IR as numba intrinsics: the tile block `amx_block`, the
expansion of weight bits into tile bytes `expand_rows`, and the per-pixel epilogue pieces
`add_scaled_row`, `finish_row` and `code_row`.

    out[i, j] = sum_{t < k_steps} sum_{c < 64} codes[a_start + offsets[t] + i' * a_stride + c]
                                               * weights[b_start + 2048 t + tile(j) ...]
    (i < 32 rows, j < 32 columns; exact int32)

AMX-INT8 multiplies 16 x 64 bytes by 64 x 16 bytes into 16 x 16 int32 per instruction (TDPBUSD:
unsigned bytes by signed bytes), about 930 multiply-adds per cycle on the Xeon measured
(docs/benchmarks.md), 2.7 times the AND + VPOPCNTQ + ADD rate of the same core on one bit each. With activation codes and weight bits held
as bytes (0/1, or the level index q of a binary code), the counts of the PA combine
(engine/ops/pa_conv.py) come out of these products exactly.

The micro-kernel computes a block of 32 rows (two A tiles of 16 rows, `a_stride` bytes apart,
the second starting at `a_second`) by 32 columns (two B tiles) over k_steps steps of 64 bytes:
A tile rows start at codes[a_start + offsets[t]] (and a_second + offsets[t]), B tiles are 2048
consecutive bytes per step (`weights`: [step, tile, 16 rows of 4-byte groups, 16 columns x 4
bytes], the tiles `expand_rows` makes of amx_conv.pack_weight_tiles' bits). It accumulates the four int32
tiles over all steps and stores them to out (int32, 32 x 32 row-major). A thread loads the tile
configuration once (`amx_start`) before its blocks and releases the tiles after them (`amx_end`):
loading it per block cost a quarter of the speed on 9-step blocks.

Using AMX needs the CPU (amx-tile, amx-int8 in LLVM's host features), numba compiling for the
host (no NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override, which `NUMBA_CPU_NAME=generic` sets), and
on Linux the kernel's permission for the process (arch_prctl ARCH_REQ_XCOMP_PERM), asked once by
`available()`. Elsewhere `available()` is False and nothing here is compiled.

Each intrinsic has a plain-numpy twin (`*_reference`) that the tests compare it with.
"""
import ctypes
import functools
import platform
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_ir import CodegenHelpers

ROWS = 16  # rows of a tile
ROW_BYTES = 64  # bytes of a tile row
BLOCK_ROWS = 2 * ROWS  # rows of the micro-kernel's block (two A tiles)
BLOCK_COLUMNS = 2 * 16  # int32 columns of the block (two B tiles)
STEP_BYTES = 2 * ROWS * ROW_BYTES  # weight bytes of one step (two B tiles)

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64


@functools.lru_cache(maxsize=None)
def available():
    """Whether AmxConv can run here: the CPU has AMX-INT8, numba compiles for this host, and the OS
    lets this process use the tiles (asked once; a fork inherits the permission)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    if not (features.get("amx-tile") and features.get("amx-int8")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                        ctypes.c_long(_XFEATURE_XTILEDATA)) == 0


def _flag(builder, value):
    """A numba bool argument as an i1 (for a branch or a select)."""
    return value if value.type == ir.IntType(1) else builder.trunc(value, ir.IntType(1))


def _declare(builder, name, arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arguments), name)


def _tile_config(builder):
    """ldtilecfg of palette 1 with eight tiles of 16 rows x 64 bytes."""
    i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
    config_type = ir.ArrayType(i8, 64)
    config = cgutils.alloca_once(builder, config_type)
    builder.store(ir.Constant(config_type, None), config)
    config_bytes = builder.bitcast(config, i8.as_pointer())
    builder.store(ir.Constant(i8, 1), config_bytes)
    for tile in range(8):
        column_bytes = builder.bitcast(builder.gep(config_bytes, [ir.Constant(i64, 16 + 2 * tile)]), i16.as_pointer())
        builder.store(ir.Constant(i16, ROW_BYTES), column_bytes)
        builder.store(ir.Constant(i8, ROWS), builder.gep(config_bytes, [ir.Constant(i64, 48 + tile)]))
    builder.call(_declare(builder, "llvm.x86.ldtilecfg", [i8.as_pointer()]), [config_bytes])


@intrinsic
def amx_start(typingctx):
    """Load the tile configuration amx_block needs, in the calling thread (once before its calls;
    tiles are per-thread state). Pair with amx_end."""
    def codegen(context, builder, sig, args):
        _tile_config(builder)
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def amx_end(typingctx):
    """Release the tiles (the thread's tile state returns to its initial, cheap to switch, state)."""
    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def amx_block(typingctx, codes, offsets, k_steps, a_start, a_second, a_stride, weights, b_start, out):
    """out[32 x 32] = the block described in the module docstring (after amx_start in this thread).

    codes: 1-D contiguous uint8; offsets: 1-D contiguous int64 [>= k_steps]; k_steps (>= 1),
    a_start, a_second, a_stride, b_start: int64; weights: 1-D contiguous int8; out: 1-D contiguous
    int32 [>= 1024]. Every byte read must lie inside codes and weights (not checked); tile rows at
    64-byte boundaries load about three times faster than rows that straddle cache lines."""
    sig = types.void(codes, offsets, k_steps, a_start, a_second, a_stride, weights, b_start, out)

    def codegen(context, builder, sig, args):
        i8, i64 = ir.IntType(8), ir.IntType(64)
        byte_pointer = i8.as_pointer()

        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        codes_data = builder.bitcast(data(0), byte_pointer)
        offsets_data, weights_data = data(1), builder.bitcast(data(6), byte_pointer)
        out_data = builder.bitcast(data(8), byte_pointer)
        k_steps, a_start, a_second, a_stride, b_start = args[2], args[3], args[4], args[5], args[7]
        zero = _declare(builder, "llvm.x86.tilezero", [i8])
        load = _declare(builder, "llvm.x86.tileloadd64", [i8, byte_pointer, i64])
        dot = _declare(builder, "llvm.x86.tdpbusd", [i8, i8, i8])
        store = _declare(builder, "llvm.x86.tilestored64", [i8, byte_pointer, i64])
        for tile in range(4):  # accumulators: tiles 0..3; A: 4, 5; B: 6, 7
            builder.call(zero, [ir.Constant(i8, tile)])
        entry = builder.block
        loop = builder.append_basic_block("amx.loop")
        done = builder.append_basic_block("amx.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        offset = builder.load(builder.gep(offsets_data, [t]))
        first = builder.gep(codes_data, [builder.add(a_start, offset)])
        second = builder.gep(codes_data, [builder.add(a_second, offset)])
        b_first = builder.gep(weights_data, [builder.add(b_start, builder.mul(t, ir.Constant(i64, STEP_BYTES)))])
        b_second = builder.gep(b_first, [ir.Constant(i64, STEP_BYTES // 2)])
        builder.call(load, [ir.Constant(i8, 4), first, a_stride])
        builder.call(load, [ir.Constant(i8, 5), second, a_stride])
        builder.call(load, [ir.Constant(i8, 6), b_first, ir.Constant(i64, ROW_BYTES)])
        builder.call(load, [ir.Constant(i8, 7), b_second, ir.Constant(i64, ROW_BYTES)])
        for accumulator, a, b in ((0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7)):
            builder.call(dot, [ir.Constant(i8, accumulator), ir.Constant(i8, a), ir.Constant(i8, b)])
        next_t = builder.add(t, ir.Constant(i64, 1))
        t.add_incoming(next_t, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_t, k_steps), loop, done)
        builder.position_at_end(done)
        row_bytes = 4 * BLOCK_COLUMNS
        for accumulator, offset in ((0, 0), (1, 64), (2, ROWS * row_bytes), (3, ROWS * row_bytes + 64)):
            builder.call(store, [ir.Constant(i8, accumulator), builder.gep(out_data, [ir.Constant(i64, offset)]),
                                 ir.Constant(i64, row_bytes)])
        return context.get_dummy_value()

    return sig, codegen


def aligned_empty(size, dtype):
    """np.empty(size, dtype) whose data starts at a 64-byte boundary (a cache line)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + ROW_BYTES, dtype=np.uint8)
    skip = (-raw.ctypes.data) % ROW_BYTES
    return raw[skip:skip + size * itemsize].view(dtype)


def amx_block_reference(codes, offsets, k_steps, a_start, a_second, a_stride, weights, b_start):
    """int64 [32, 32]: what amx_block writes to out, in plain numpy."""
    a = np.zeros((BLOCK_ROWS, k_steps * ROW_BYTES), dtype=np.int64)
    for t in range(k_steps):
        for i in range(BLOCK_ROWS):
            start = (a_start if i < ROWS else a_second) + offsets[t] + (i % ROWS) * a_stride
            a[i, t * ROW_BYTES:(t + 1) * ROW_BYTES] = codes[start:start + ROW_BYTES]
    # A step's bytes: [tile, row r, column j, 4 bytes i] holds B[4 r + i, 16 tile + j].
    steps = weights[b_start:b_start + k_steps * STEP_BYTES].astype(np.int64).reshape(k_steps, 2, ROWS, 16, 4)
    b = steps.transpose(0, 2, 4, 1, 3).reshape(k_steps * ROW_BYTES, BLOCK_COLUMNS)
    return a @ b


def _row_types():
    return ir.VectorType(ir.IntType(32), BLOCK_COLUMNS), ir.VectorType(ir.DoubleType(), BLOCK_COLUMNS), \
        ir.VectorType(ir.FloatType(), BLOCK_COLUMNS)


@intrinsic
def add_scaled_row(typingctx, partial, partial_start, scales, scales_start, counts, counts_start):
    """partial[partial_start + j] += scales[scales_start + j] * counts[counts_start + j] for j < 32
    (a multiply, then an add, in float64), in 512-bit vectors.

    partial, scales: 1-D contiguous float64; counts: 1-D contiguous int32; the starts: int64."""
    sig = types.void(partial, partial_start, scales, scales_start, counts, counts_start)

    def codegen(context, builder, sig, args):
        helpers = CodegenHelpers(context, builder, sig, args)
        i32_row, double_row, _ = _row_types()
        sums = helpers.vector_at(helpers.data(0), args[1], double_row)
        products = builder.fmul(builder.load(helpers.vector_at(helpers.data(2), args[3], double_row), align=8),
                                builder.sitofp(builder.load(helpers.vector_at(helpers.data(4), args[5], i32_row),
                                                            align=4), double_row))
        builder.store(builder.fadd(builder.load(sums, align=8), products), sums, align=8)
        return context.get_dummy_value()

    return sig, codegen


def add_scaled_row_reference(partial, partial_start, scales, scales_start, counts, counts_start):
    """The plain-numpy twin of add_scaled_row (in place)."""
    rows = slice(partial_start, partial_start + BLOCK_COLUMNS)
    partial[rows] += scales[scales_start:scales_start + BLOCK_COLUMNS] * counts[counts_start:counts_start + BLOCK_COLUMNS]


@intrinsic
def finish_row(typingctx, partial, partial_start, has_partial, scales, scales_start, counts, counts_start, constant,
               lowest_weight, first, act_term, residual, residual_start, has_residual, relu, y, y_start, last):
    """The PA combine of one pixel's 32 channels first .. first + 31, their last (plane, row) pair's
    counts included, and its epilogue, for j < last (<= 32):

        sums = (partial[partial_start + j] if has_partial else 0) + scales[scales_start + j] * counts[counts_start + j]
        value = constant[first + j] + lowest_weight[first + j] * act_term + sums
        value += residual[residual_start + j]           (when has_residual)
        value = 0 if value < 0 else value               (when relu; NaN stays NaN, as np.maximum)
        y[y_start + j] = float32(value)

    in float64, 512-bit vectors. partial, scales, constant, lowest_weight: 1-D contiguous float64
    (32 values from each start; constant and lowest_weight from first); counts: 1-D contiguous int32;
    residual, y: 1-D contiguous float32 (only `last` values read and written); act_term: float64;
    the flags: bool; starts, first, last: int64."""
    sig = types.void(partial, partial_start, has_partial, scales, scales_start, counts, counts_start, constant,
                     lowest_weight, first, act_term, residual, residual_start, has_residual, relu, y, y_start, last)

    def codegen(context, builder, sig, args):
        helpers = CodegenHelpers(context, builder, sig, args)
        partial_start, has_partial, scales_start, counts_start = args[1], args[2], args[4], args[6]
        first, act_term, residual_start, has_residual, relu, y_start, last = args[9], args[10], args[12], args[13], \
            args[14], args[16], args[17]
        i32_row, double_row, float_row = _row_types()
        counts_row = builder.load(helpers.vector_at(helpers.data(5), counts_start, i32_row), align=4)
        products = builder.fmul(builder.load(helpers.vector_at(helpers.data(3), scales_start, double_row), align=8),
                                builder.sitofp(counts_row, double_row))
        # The partial sums are read only when there are some (a slot keeps the value between branches).
        sums = cgutils.alloca_once_value(builder, ir.Constant(double_row, None))
        with builder.if_then(_flag(builder, has_partial)):
            builder.store(builder.load(helpers.vector_at(helpers.data(0), partial_start, double_row), align=8), sums)
        value = cgutils.alloca_once_value(builder, builder.fadd(
            builder.fadd(builder.load(helpers.vector_at(helpers.data(7), first, double_row), align=8),
                         builder.fmul(builder.load(helpers.vector_at(helpers.data(8), first, double_row), align=8),
                                      helpers.splat(act_term, double_row))),
            builder.fadd(builder.load(sums), products)))
        with builder.if_then(_flag(builder, has_residual)):
            shortcut = helpers.load_lanes(builder.gep(helpers.data(11), [residual_start]), float_row, last)
            builder.store(builder.fadd(builder.load(value), builder.fpext(shortcut, double_row)), value)
        with builder.if_then(_flag(builder, relu)):
            current = builder.load(value)
            negative = builder.fcmp_ordered("<", current, ir.Constant(double_row, None))
            builder.store(builder.select(negative, ir.Constant(double_row, None), current), value)
        helpers.store_lanes("finish_row", builder.gep(helpers.data(15), [y_start]),
                            builder.fptrunc(builder.load(value), float_row), last)
        return context.get_dummy_value()

    return sig, codegen


def finish_row_reference(partial, partial_start, has_partial, scales, scales_start, counts, counts_start, constant,
                         lowest_weight, first, act_term, residual, residual_start, has_residual, relu, y, y_start,
                         last):
    """The plain-numpy twin of finish_row (writes y in place)."""
    columns = slice(0, last)
    sums = (partial[partial_start:partial_start + BLOCK_COLUMNS] if has_partial else np.zeros(BLOCK_COLUMNS)) \
        + scales[scales_start:scales_start + BLOCK_COLUMNS] * counts[counts_start:counts_start + BLOCK_COLUMNS]
    value = (constant[first:first + BLOCK_COLUMNS] + lowest_weight[first:first + BLOCK_COLUMNS] * act_term + sums)[columns]
    if has_residual:
        value = value + residual[residual_start:residual_start + last].astype(np.float64)
    if relu:
        value = np.where(value < 0, 0.0, value)
    y[y_start:y_start + last] = value.astype(np.float32)


@intrinsic
def expand_rows(typingctx, bits, start, count, out):
    """out[64 n + b] = bit b of bits[start + n] (0 or 1) for n < count: tile rows of bytes from one
    uint64 each (on AVX-512 one mask-to-bytes move per row).

    bits: 1-D contiguous uint64; start, count: int64; out: 1-D contiguous int8 [>= 64 count], 64-byte
    aligned."""
    sig = types.void(bits, start, count, out)

    def codegen(context, builder, sig, args):
        helpers = CodegenHelpers(context, builder, sig, args)
        i64 = ir.IntType(64)
        row_bits = ir.VectorType(ir.IntType(1), ROW_BYTES)
        row_bytes = ir.VectorType(ir.IntType(8), ROW_BYTES)
        bits_data, out_data = helpers.data(0), helpers.data(3)

        def row(n, _):
            word = builder.load(builder.gep(bits_data, [builder.add(args[1], n)]))
            expanded = builder.zext(builder.bitcast(word, row_bits), row_bytes)
            builder.store(expanded, helpers.vector_at(out_data, builder.mul(n, ir.Constant(i64, ROW_BYTES)), row_bytes),
                          align=64)
            return []

        with builder.if_then(builder.icmp_signed(">", args[2], ir.Constant(i64, 0))):
            helpers.counted_loop("expand_rows", args[2], [], row)
        return context.get_dummy_value()

    return sig, codegen


def expand_rows_reference(bits, start, count):
    """int8 [64 count]: what expand_rows writes, in plain numpy."""
    words = np.ascontiguousarray(bits[start:start + count], dtype=np.uint64)
    return np.unpackbits(words.view(np.uint8), bitorder="little").astype(np.int8)


@intrinsic
def code_row(typingctx, y, y_start, thresholds, thresholds_start, n_thresholds, thresholds_stride, binary, codes,
             codes_start, rows_stride, last):
    """The next layer's codes of `last` (<= 32) float32 values y[y_start + j]: for thresholds row j
    (thresholds[thresholds_start + j * thresholds_stride + lane], j < n_thresholds),

        binary:      codes[codes_start + lane] = #{j : y >= threshold j}
        thermometer: codes[codes_start + j * rows_stride + lane] = (y >= threshold j)

    (x >= s is False for NaN, as the packing's). y, thresholds: 1-D contiguous float32 (32
    thresholds from each row's start, +inf past the channels); codes: 1-D contiguous uint8; the rest
    int64, binary a bool."""
    sig = types.void(y, y_start, thresholds, thresholds_start, n_thresholds, thresholds_stride, binary, codes,
                     codes_start, rows_stride, last)

    def codegen(context, builder, sig, args):
        helpers = CodegenHelpers(context, builder, sig, args)
        y_start, thresholds_start, n_thresholds, thresholds_stride = args[1], args[3], args[4], args[5]
        binary, codes_start, rows_stride, last = args[6], args[8], args[9], args[10]
        binary = _flag(builder, binary)
        _, _, float_row = _row_types()
        byte_row = ir.VectorType(ir.IntType(8), BLOCK_COLUMNS)
        values = helpers.load_lanes(builder.gep(helpers.data(0), [y_start]), float_row, last)
        codes_data = helpers.data(7)
        levels = cgutils.alloca_once_value(builder, ir.Constant(byte_row, None))

        def threshold(j, _):
            row = builder.add(thresholds_start, builder.mul(j, thresholds_stride))
            passed = builder.zext(builder.fcmp_ordered(">=", values, builder.load(
                helpers.vector_at(helpers.data(2), row, float_row), align=4)), byte_row)
            with builder.if_else(binary) as (count, plane):
                with count:
                    builder.store(builder.add(builder.load(levels), passed), levels)
                with plane:
                    helpers.store_lanes("code_row.plane", builder.gep(codes_data, [
                        builder.add(codes_start, builder.mul(j, rows_stride))]), passed, last)
            return []

        with builder.if_then(builder.icmp_signed(">", n_thresholds, ir.Constant(ir.IntType(64), 0))):
            helpers.counted_loop("code_row", n_thresholds, [], threshold)
        with builder.if_then(binary):
            helpers.store_lanes("code_row.level", builder.gep(codes_data, [codes_start]), builder.load(levels), last)
        return context.get_dummy_value()

    return sig, codegen


def code_row_reference(y, y_start, thresholds, thresholds_start, n_thresholds, thresholds_stride, binary, codes,
                       codes_start, rows_stride, last):
    """The plain-numpy twin of code_row (writes codes in place)."""
    values = y[y_start:y_start + last]
    passed = [values >= thresholds[thresholds_start + j * thresholds_stride:][:last] for j in range(n_thresholds)]
    if binary:
        codes[codes_start:codes_start + last] = np.sum(passed, axis=0)
    else:
        for j in range(n_thresholds):
            codes[codes_start + j * rows_stride:codes_start + j * rows_stride + last] = passed[j]
