"""Winograd F(2x2, 3x3): the float Conv's executor for 3x3 kernels, stride 1, dilation 1, one group.

Each 2x2 output tile of channel o comes from the 4x4 input tile d_c (rows 2ty-top.., columns
2tx-left.., zero-padded) of every input channel c:

    y_o = A^T [ sum_c U_oc (.) V_c ] A,   U_oc = G g_oc G^T,   V_c = B^T d_c B

((.) is the elementwise product). Per position xi of the 4x4 transformed tile the sum over c is
a matrix product, so the conv is 16 GEMMs [O x C] @ [C x tiles] in place of one
[O x 9C] @ [9C x 4 tiles] (im2col): 16 multiplications per 4 outputs instead of 36, 2.25x fewer.
The transforms hold only additions, subtractions and halvings (exact in binary), so the results
differ from a direct conv by float32 rounding of a few more terms (tests/tolerances.py).

Data per tile-row chunk (the chunk's V and M stay in cache; chunks never depend on the thread
count): V float32 [16, C, tiles], M = U @ V float32 [16, O, tiles], tiles of the chunk in row-major
order. Plain-numpy twins of the two transforms (`*_reference`) are the kernels' oracles.
"""
import numpy as np

from ..jit import jit

G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
B_T = np.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
A_T = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])


def transform_weights(weight):
    """U float32 [16, O, C] from weight [O, C, 3, 3]: U[4i+j, o, c] = (G g_oc G^T)[i, j], in float64
    then rounded once."""
    out_channels, in_channels = weight.shape[:2]
    u = np.einsum("ik,ockl,jl->ijoc", G, weight.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(16, out_channels, in_channels).astype(np.float32))


def tile_counts(out_hw):
    """(tile rows, tile columns) covering out_h x out_w with 2x2 tiles."""
    return -(-out_hw[0] // 2), -(-out_hw[1] // 2)


def tile_planes(rows, tiles):
    """An uninitialized float32 [16, rows, tiles] array whose 16 planes lie 64 bytes further apart
    than their size: with channel counts such as 256 the size is a multiple of 4096 bytes, and 16
    streams written at such a distance compete for the same cache sets (the input transform ran
    12x slower)."""
    plane = rows * tiles + 16
    return np.empty(16 * plane, dtype=np.float32).reshape(16, plane)[:, :rows * tiles].reshape(16, rows, tiles)


def padded_sample(x, pads, tiles_hw):
    """x [C, H, W] zero-padded to [C, 2*tile_rows + 2, 2*tile_columns + 2] (top/left pads first; the
    bottom and right hold the pads and whatever the last tiles overhang)."""
    channels, height, width = x.shape
    top, left = pads[0], pads[1]
    padded = np.zeros((channels, 2 * tiles_hw[0] + 2, 2 * tiles_hw[1] + 2), dtype=np.float32)
    padded[:, top:top + height, left:left + width] = x
    return padded


@jit
def input_tiles(padded, first_tile_row, stop_tile_row, v):
    """v[4i+j, c, t] = (B^T d B)[i, j] for the 4x4 tile d at rows 2ty.., columns 2tx.. of padded[c],
    t = (ty - first_tile_row) * tile_columns + tx, tile_columns = (padded width - 2) // 2."""
    channels = padded.shape[0]
    tile_columns = (padded.shape[2] - 2) // 2
    for c in range(channels):
        for ty in range(first_tile_row, stop_tile_row):
            base = (ty - first_tile_row) * tile_columns
            r0 = padded[c, 2 * ty]
            r1 = padded[c, 2 * ty + 1]
            r2 = padded[c, 2 * ty + 2]
            r3 = padded[c, 2 * ty + 3]
            for tx in range(tile_columns):
                k = 2 * tx
                # B^T d: rows combined (row 0 - row 2, row 1 + row 2, row 2 - row 1, row 1 - row 3).
                a0 = r0[k] - r2[k]
                a1 = r0[k + 1] - r2[k + 1]
                a2 = r0[k + 2] - r2[k + 2]
                a3 = r0[k + 3] - r2[k + 3]
                b0 = r1[k] + r2[k]
                b1 = r1[k + 1] + r2[k + 1]
                b2 = r1[k + 2] + r2[k + 2]
                b3 = r1[k + 3] + r2[k + 3]
                e0 = r2[k] - r1[k]
                e1 = r2[k + 1] - r1[k + 1]
                e2 = r2[k + 2] - r1[k + 2]
                e3 = r2[k + 3] - r1[k + 3]
                f0 = r1[k] - r3[k]
                f1 = r1[k + 1] - r3[k + 1]
                f2 = r1[k + 2] - r3[k + 2]
                f3 = r1[k + 3] - r3[k + 3]
                t = base + tx
                # (...) B: the same combinations of the columns.
                v[0, c, t] = a0 - a2
                v[1, c, t] = a1 + a2
                v[2, c, t] = a2 - a1
                v[3, c, t] = a1 - a3
                v[4, c, t] = b0 - b2
                v[5, c, t] = b1 + b2
                v[6, c, t] = b2 - b1
                v[7, c, t] = b1 - b3
                v[8, c, t] = e0 - e2
                v[9, c, t] = e1 + e2
                v[10, c, t] = e2 - e1
                v[11, c, t] = e1 - e3
                v[12, c, t] = f0 - f2
                v[13, c, t] = f1 + f2
                v[14, c, t] = f2 - f1
                v[15, c, t] = f1 - f3


@jit
def output_tiles(m, bias, first_tile_row, stop_tile_row, tile_columns, y):
    """y[o, 2ty+i, 2tx+j] = (A^T M_o A)[i, j] + bias[o] for the tiles of the chunk, inside y
    (y float32 [O, out_h, out_w]; m float32 [16, O, tiles])."""
    out_channels, out_h, out_w = y.shape
    for o in range(out_channels):
        for ty in range(first_tile_row, stop_tile_row):
            base = (ty - first_tile_row) * tile_columns
            oy = 2 * ty
            for tx in range(tile_columns):
                t = base + tx
                # A^T M: row 0 + row 1 + row 2, row 1 - row 2 - row 3, per column.
                s0 = m[0, o, t] + m[4, o, t] + m[8, o, t]
                s1 = m[1, o, t] + m[5, o, t] + m[9, o, t]
                s2 = m[2, o, t] + m[6, o, t] + m[10, o, t]
                s3 = m[3, o, t] + m[7, o, t] + m[11, o, t]
                d0 = m[4, o, t] - m[8, o, t] - m[12, o, t]
                d1 = m[5, o, t] - m[9, o, t] - m[13, o, t]
                d2 = m[6, o, t] - m[10, o, t] - m[14, o, t]
                d3 = m[7, o, t] - m[11, o, t] - m[15, o, t]
                ox = 2 * tx
                y[o, oy, ox] = s0 + s1 + s2 + bias[o]
                if ox + 1 < out_w:
                    y[o, oy, ox + 1] = s1 - s2 - s3 + bias[o]
                if oy + 1 < out_h:
                    y[o, oy + 1, ox] = d0 + d1 + d2 + bias[o]
                    if ox + 1 < out_w:
                        y[o, oy + 1, ox + 1] = d1 - d2 - d3 + bias[o]


def input_tiles_reference(padded, first_tile_row, stop_tile_row):
    """Plain twin of `input_tiles`: V [16, C, tiles] as B^T d B, one tile at a time, float64."""
    channels, _, width = padded.shape
    tile_columns = (width - 2) // 2
    v = np.zeros((16, channels, (stop_tile_row - first_tile_row) * tile_columns))
    for ty in range(first_tile_row, stop_tile_row):
        for tx in range(tile_columns):
            d = padded[:, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4].astype(np.float64)
            tile = np.einsum("ik,ckl,jl->ijc", B_T, d, B_T)
            v[:, :, (ty - first_tile_row) * tile_columns + tx] = tile.reshape(16, channels)
    return v


def output_tiles_reference(m, bias, first_tile_row, stop_tile_row, tile_columns, out_hw):
    """Plain twin of `output_tiles`: the chunk's rows of y, float64 [O, rows, out_w] with rows =
    min(2 * stop_tile_row, out_h) - 2 * first_tile_row."""
    out_channels = m.shape[1]
    rows = min(2 * stop_tile_row, out_hw[0]) - 2 * first_tile_row
    y = np.zeros((out_channels, 2 * (stop_tile_row - first_tile_row), 2 * tile_columns))
    for ty in range(stop_tile_row - first_tile_row):
        for tx in range(tile_columns):
            tile = m[:, :, ty * tile_columns + tx].astype(np.float64).reshape(4, 4, out_channels)
            y[:, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2] = np.einsum("ik,klo,jl->oij", A_T, tile, A_T)
    return y[:, :rows, :out_hw[1]] + bias[:, None, None]
