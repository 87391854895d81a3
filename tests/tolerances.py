"""Every numerical tolerance of the test suite, stated once with its reason.

Errors are measured relative to the largest magnitude of the expected tensor (`scale`), so a
tolerance means "this many float32 ulps of the output's scale".
"""
import numpy as np

# PA kernels: every popcount is an exact integer and the combine runs in float64; only the
# final cast to float32 rounds (half an ulp, 6e-8), plus the reference's own float64 sums.
PA_COMBINE_RTOL = 1e-6

# Float kernels (conv/gemm/pool in float32 vs the float64 reference, or vs onnxruntime/torch in
# float32): sums of up to a few thousand float32 products in a different order; the worst
# case grows like K * 2^-24 of the scale, and K <= 4608 in these tests -> about 3e-4 worst
# case; observed errors sit near 1e-6. 2e-5 is tight enough to catch any wrong tap or weight.
FLOAT32_RTOL = 2e-5

# Two float64 evaluations of the same formula in a different order (a fused kernel against its
# composition of plain ops): sums of up to about 10^4 terms round at most K * 2^-53 ~ 1e-12 of
# the scale.
FLOAT64_RTOL = 1e-12


def assert_close(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max(1, max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol:g} * scale {scale:.3g}"

# A model exported to ONNX (converters/onnx_export.py) in onnxruntime against a pabnn Session.
# Node by node, on the same float32 inputs, every threshold comparison is identical (the same
# float32 value against the same float32 threshold) and only the float32 sums of the Conv/Gemm
# and of the staircase levels round differently: FLOAT32_RTOL. Through a whole model those
# rounding differences reach the next layer's quantizer, and an activation within rounding of a
# threshold can land on the other level, moving its sample's logits by a level step times the
# weights that read it (measured on digits_resnet PA(4,5): 1 sample of 256, 0.4% of the logit
# scale). Whole-model comparisons allow at most this fraction of samples beyond FLOAT32_RTOL, and
# the same fraction of top-1 disagreements.
EXPORT_FLIPPED_SAMPLE_FRACTION = 0.02
