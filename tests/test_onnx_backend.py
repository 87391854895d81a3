"""ONNX's own backend node tests (`onnx.backend.test`) against the engine's float path.

A small adapter (onnx.backend.base.Backend / BackendRep) imports each test model with
`pabnn.converters.import_onnx` and runs it with `pabnn.engine.Session`. Dimension 0 of every
graph input is taken as the batch (the test data's shapes are static). Every node test whose ops
all have a converter runs, except the EXCLUDED ones, each listed with its reason; outputs must
equal ONNX's expected outputs within FLOAT32_RTOL. Models written at an opset above 21 (pabnn's
newest) run at opset 21 when every op in them has the same inputs, outputs and attributes there.

`python tests/test_onnx_backend.py` prints the pass count per op; pytest prints it at the end of
this module's tests.
"""
import re
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx.backend.base import Backend, BackendRep
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import import_onnx, supported_onnx_ops
from pabnn.converters.onnx_registry import SUPPORTED_OPSETS
from pabnn.converters.onnx_opset_upgrade import REWRITTEN_OPS
from pabnn.engine import Session

# (pattern matched against the test name, reason). Every selected test that does not pass is here.
EXCLUDED = [
    (r"^test_(averagepool|maxpool)_(1d|3d)_", "1-D and 3-D pooling: pabnn pools are 2-D (NCHW)"),
    (r"^test_convtranspose_(1d|3d)$", "1-D and 3-D transposed convolutions: pabnn's are 2-D"),
    (r"^test_causal_conv_with_state_", "1-D convolution: pabnn convolutions are 2-D"),
    (r"^test_averagepool_2d_ceil_last_window_starts_on_pad$", "ceil_mode=1 with count_include_pad=1 is refused"),
    (r"_training_mode$", "BatchNormalization in training mode: pabnn imports inference graphs"),
    (r"^test_(concat_1d_|concat_2d_axis_(0|negative_2)$|concat_3d_axis_(0|negative_3)$|split_.*(1d|default_axis))",
     "concatenates or splits along axis 0, the batch axis"),
    (r"^test_(softmax|logsoftmax)_axis_0", "normalizes over axis 0, the batch axis"),
    (r"^test_flatten_(axis[023]|negative_axis[124])$", "Flatten with axis != 1 folds the batch axis into the rows"),
    (r"^test_transpose_(default|all_permutations_[2-5])$", "the permutation moves axis 0, the batch axis"),
    (r"^test_reduce_(max|mean|sum|sum_square)_default_axes_", "reduces over every axis, the batch axis included"),
    (r"_empty_set(_non_reduced_axis_zero)?(_expanded)?$", "a zero-size input dimension: pabnn tensors are non-empty"),
    (r"^test_slice_start_out_of_bounds$", "an empty (zero-size) output: pabnn tensors are non-empty"),
    (r"^test_gather_", "Gather of run-time data: pabnn folds Gather on constants and shapes only"),
    (r"^test_reshape_(extended_dims|negative_dim|negative_extended_dims|one_dim|reduced_dims|reordered_all_dims|"
     r"reordered_last_dims|zero_and_negative_dim|zero_dim)$", "the target shape fixes or moves axis 0, the batch"),
    (r"^test_reshape_allowzero_reordered$", "Reshape with allowzero=1 and a zero in the shape"),
    (r"^test_resize_tf_crop_and_resize", "Resize mode linear with tf_crop_and_resize: pabnn resizes with nearest only"),
    (r"^test_slice(_default_axes|_default_steps|_neg_steps|_negative_axes)?$", "slices axis 0, the batch axis"),
    (r"^test_split_zero_size_splits_", "splits axis 0, the batch axis (into zero-size parts)"),
    (r"^test_(squeeze|unsqueeze_axis_0)$", "squeezes or inserts axis 0, the batch axis"),
    (r"^test_gemm_(all_attributes|transposeA)$", "Gemm transA=1 (the batch would become the inner dimension)"),
    (r"^test_gemm_default_matrix_bias$", "the bias C varies along axis 0, the batch axis"),
    (r"^test_prelu_example$", "the slope has axis 0 (it would differ per sample)"),
    (r"^test_matmul_1d_(1d|3d)$", "the run-time operand is 1-D: its only axis is the batch"),
    (r"^test_rotary_embedding_", "the expanded function broadcasts a constant against the batch axis"),
    (r"^test_(depth|space)to(space|depth)_.*expanded$", "the expanded function reshapes with allowzero=1"),
    (r"^test_(identity|sum_one_input|dropout_default|dropout_default_old|dropout_default_ratio|dropout_random_old|"
     r"clip_default_inbounds_expanded|reduce_sum_empty_axes_input_noop(_example)?|training_dropout(_default|"
     r"_zero_ratio)?)$", "the graph output is its input: there is no node to run"),
    (r"^test_identity_(opt|sequence)$", "optional and sequence types: pabnn runs float32 tensors only"),
    (r"^test_constant$", "no graph input: the output is a constant"),
    (r"^test_range_", "Range with run-time inputs: pabnn folds Range on constants only"),
    (r"^test_resize_.*(linear|cubic)", "Resize modes linear and cubic: pabnn resizes with nearest only"),
    (r"^test_clip_(.*_)?expanded$", "the expanded function's Where picks run-time values: pabnn takes Where only as a "
                                 "two-level quantizer (constant values, a comparison with a constant)"),
    (r"^test_sign$", "the input is 1-D: its only axis is the batch (Sign quantizes per channel, axis 1)"),
]


# Ops whose inputs after the first are data like the first (every other op's later inputs are
# parameters: weights, slopes, bounds, scales, pads).
DATA_INPUT_OPS = ("Add", "Sub", "Mul", "Div", "MatMul", "Concat", "Sum")


class PabnnBackendRep(BackendRep):
    """Imports the model when the inputs arrive: graph inputs that are parameters in a deployed model
    (read as a later input of a non-data op, or without the first input's batch size) are bound
    to the given values as initializers first, as a converted model holds its weights."""

    def __init__(self, model):
        self.model = model

    def run(self, inputs, **kwargs):
        graph_inputs = [value for value in self.model.graph.input
                        if value.name not in {i.name for i in self.model.graph.initializer}]
        values = {value.name: np.asarray(array) for value, array in zip(graph_inputs, inputs)}
        first = values[graph_inputs[0].name]
        parameters = {name for node in self.model.graph.node if node.op_type not in DATA_INPUT_OPS
                      for name in node.input[1:]}
        frozen = {name: array for name, array in list(values.items())[1:]
                  if name in parameters or array.ndim != first.ndim or array.shape[:1] != first.shape[:1]}
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        kept = [value for value in model.graph.input if value.name not in frozen]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.graph.initializer.extend(onnx.numpy_helper.from_array(array, name) for name, array in frozen.items())
        session = Session(import_onnx(model), threads=1)
        return session.run(None, {name: values[name] for name in session.input_names})


class PabnnBackend(Backend):
    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        super().prepare(model, device, **kwargs)
        return PabnnBackendRep(at_supported_opset(model))

    @classmethod
    def supports_device(cls, device):
        return device == "CPU"


def _signature(op_type, opset):
    schema = onnx.defs.get_schema(op_type, opset)
    return ([i.name for i in schema.inputs], [o.name for o in schema.outputs], sorted(schema.attributes))


def at_supported_opset(model):
    """`model` at opset 21 when it is newer and its ops have the same signature at 21, else unchanged."""
    newest = SUPPORTED_OPSETS[1]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset <= newest:
        return model
    if any(_signature(node.op_type, opset) != _signature(node.op_type, newest) for node in model.graph.node):
        return model
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    for entry in clone.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = newest
    return clone


def _float32_only(case):
    """The data input (the first) and every output are float32 (later inputs may be int64 parameters)."""
    inputs, outputs = case.data_sets[0]
    arrays = [np.asarray(a) for a in list(inputs[:1]) + list(outputs)]
    return bool(arrays) and all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)


def _load_cases():
    from onnx.backend.test.loader import load_model_tests

    # Upsample (opsets 7-9) has no converter: the opset upgrade rewrites it into a Resize.
    supported = set(supported_onnx_ops()) | set(REWRITTEN_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    selected = []
    for case in cases:
        ops = {node.op_type for node in case.model.graph.node}
        if ops <= supported and case.data_sets and _float32_only(case):
            selected.append(case)
    return sorted(selected, key=lambda case: case.name)


CASES = _load_cases()
RESULTS = Counter()


def _exclusion(name):
    return next((reason for pattern, reason in EXCLUDED if re.search(pattern, name)), None)


def run_case(case):
    """Run one backend test case; raises AssertionError (or a pabnn error) on a mismatch."""
    rep = PabnnBackend.prepare(case.model, "CPU")
    for inputs, expected in case.data_sets:
        outputs = rep.run([np.asarray(a) for a in inputs])
        assert len(outputs) == len(expected)
        for index, (actual, wanted) in enumerate(zip(outputs, expected)):
            assert_close(actual, np.asarray(wanted), FLOAT32_RTOL, f"{case.name} output {index}")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_backend_node(case):
    reason = _exclusion(case.name)
    if reason is not None:
        RESULTS["excluded"] += 1
        pytest.skip(reason)
    run_case(case)
    RESULTS["passed"] += 1


def test_backend_suite_covers_the_supported_ops():
    """The suite is not empty and reaches the op families pabnn converts."""
    ops = {node.op_type for case in CASES for node in case.model.graph.node}
    assert {"Conv", "ConvTranspose", "Concat", "Resize", "Slice", "Pad", "Transpose", "MatMul", "Softmax"} <= ops


@pytest.fixture(scope="module", autouse=True)
def _print_pass_count(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and RESULTS:
        reporter.write_line(f"\nONNX backend node tests: {RESULTS['passed']} passed, {RESULTS['excluded']} excluded "
                            f"with a reason, of {len(CASES)} selected")


if __name__ == "__main__":
    outcome = Counter()
    for case in CASES:
        reason = _exclusion(case.name)
        try:
            if reason is None:
                run_case(case)
            status = "excluded" if reason else "passed"
        except Exception as error:  # report every failure, then the totals
            status = "FAILED"
            print(f"FAILED {case.name}: {type(error).__name__}: {str(error)[:300]}")
        outcome[status] += 1
    print(dict(outcome), "of", len(CASES))
