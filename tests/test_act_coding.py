"""The binary activation code of PAConv/PALinear (act_coding="binary", engine/ops/pa_conv.py):
packing against its numpy twin, kernel against the reference, the same values as a thermometer
code with equal steps, validation, cost, and the hand-off of planes into a binary-coded reader."""
import numpy as np
import pytest
from test_pa_conv import GEOMETRIES, random_pa_node, run_both
from tolerances import PA_COMBINE_RTOL, assert_close

from pabnn.engine import Session, load_graph, model_report, run_reference, save
from pabnn.engine.bits import binary_planes, pack_activations, pack_activations_reference, unpack_bits_last_axis
from pabnn.engine.errors import GraphError
from pabnn.engine.fusion import fuse_epilogues
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops import get_op
from pabnn.engine.ops.pa_conv import act_quantize, binary_plane_steps
from pabnn.engine.plan import lower

THRESHOLD_COUNTS = [1, 2, 3, 4, 5, 7]  # B = 1, 2, 2, 3, 3, 3


def binary_node(rng, out_channels, in_channels, n_thresholds, step=0.37, **kwargs):
    """random_pa_node with N thresholds in the binary code: act_steps = step * 2^b."""
    node = random_pa_node(rng, out_channels, in_channels, act_bases=n_thresholds, **kwargs)
    node.attrs["act_coding"] = "binary"
    node.params["act_steps"] = binary_plane_steps(step, n_thresholds)
    return node


def with_threshold_ties(rng, x, thresholds):
    """x with about a third of its entries set exactly to one of their channel's thresholds."""
    x = x.copy()
    tie = rng.random(x.shape) < 0.35
    channel = np.arange(x.shape[1]).reshape((1, -1) + (1,) * (x.ndim - 2))
    which = rng.integers(thresholds.shape[0], size=x.shape)
    x[tie] = np.broadcast_to(thresholds[which, channel], x.shape)[tie]
    return x


def test_binary_planes_count():
    assert [binary_planes(n) for n in (1, 2, 3, 4, 5, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 3, 4, 4, 5]


def test_act_quantize_binary_is_lowest_plus_step_times_level_index():
    """Qa(x) = lowest + e * #{j : x >= s_j}, unsorted thresholds included."""
    rng = np.random.default_rng(0)
    thresholds = rng.normal(size=(5, 3)).astype(np.float32)  # columns not sorted
    x = rng.normal(size=(40, 3, 2))
    x[0, :, 0] = thresholds[2]  # exact ties count as passed
    level = (x[None] >= thresholds[:, None, :, None]).sum(axis=0)
    steps = binary_plane_steps(0.25, 5)
    assert steps.tolist() == [0.25, 0.5, 1.0]
    got = act_quantize(x, thresholds, steps, np.array([-1.0], np.float32), "binary")
    np.testing.assert_array_equal(got, -1.0 + 0.25 * level)


@pytest.mark.parametrize("n_thresholds", THRESHOLD_COUNTS)
@pytest.mark.parametrize("channels,group", [(3, 1), (65, 1), (130, 2)])
def test_binary_packing_equals_its_numpy_twin_and_unpacks_to_the_level_bits(n_thresholds, channels, group):
    rng = np.random.default_rng(n_thresholds * 100 + channels)
    thresholds = rng.normal(size=(n_thresholds, channels)).astype(np.float32)
    x = with_threshold_ties(rng, rng.normal(size=(2, channels, 4, 5)).astype(np.float32), thresholds)
    x[0, :, 0, 0] = np.nan
    pads, pad_value = (1, 2, 0, 1), 0.3
    fast = pack_activations(x, thresholds, pads, pad_value, group, "binary")
    reference = pack_activations_reference(x, thresholds, pads, pad_value, group, "binary")
    assert fast.shape[0] == binary_planes(n_thresholds)
    np.testing.assert_array_equal(fast, reference)
    # Unpacked, plane b of the inner pixels is bit b of q; NaN has q = 0; padding holds q(pad_value).
    level = (x[None] >= thresholds[:, None, :, None, None]).sum(axis=0)  # [B, C, H, W]
    pad_level = (np.float32(pad_value) >= thresholds).sum(axis=0)  # [C]
    words = fast.shape[-1] // group
    for b in range(fast.shape[0]):
        bits = np.concatenate([unpack_bits_last_axis(fast[b, ..., g * words:(g + 1) * words], channels // group)
                               for g in range(group)], axis=-1)  # [B, Hp, Wp, C]
        np.testing.assert_array_equal(bits[:, 1:5, 2:7], np.moveaxis((level >> b) & 1, 1, -1).astype(bool))
        np.testing.assert_array_equal(bits[:, 0, 0], np.broadcast_to((pad_level >> b) & 1, (2, channels)).astype(bool))
        assert not bits[0, 1, 2].any()


@pytest.mark.parametrize("n_thresholds", THRESHOLD_COUNTS)
@pytest.mark.parametrize("in_channels", [1, 65, 130])
@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
def test_binary_pa_conv_kernel_equals_reference(n_thresholds, in_channels, geometry):
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(in_channels * 11 + n_thresholds)
    node = binary_node(rng, 5, in_channels, n_thresholds, kernel=kernel, weight_bases=2, strides=strides, pads=pads,
                       dilations=dilations)
    x = with_threshold_ties(rng, rng.normal(size=(2, in_channels, 7, 6)).astype(np.float32),
                            node.params["act_thresholds"])
    fast, reference = run_both(node, x)
    assert_close(fast, reference, PA_COMBINE_RTOL, "binary PAConv")


@pytest.mark.parametrize("rule,pad_value", [("value_before_quantizer", -1.0), ("zero_after_quantizer", None)])
@pytest.mark.parametrize("group", [1, 5])
def test_binary_pa_conv_padding_rules_and_groups_equal_reference(rule, pad_value, group):
    rng = np.random.default_rng(group)
    node = binary_node(rng, 10, 10, 5, pads=(1, 2, 2, 1), padding_rule=rule, pad_value=pad_value, group=group)
    x = rng.normal(size=(2, 10, 6, 5)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert_close(fast, reference, PA_COMBINE_RTOL, f"binary PAConv {rule} group {group}")


@pytest.mark.parametrize("n_thresholds", [1, 4, 7])
def test_binary_pa_linear_kernel_equals_reference(n_thresholds):
    rng = np.random.default_rng(n_thresholds)
    node = binary_node(rng, 9, 70, n_thresholds, kernel=(1, 1), weight_bases=3, op="PALinear")
    x = with_threshold_ties(rng, rng.normal(size=(4, 70)).astype(np.float32), node.params["act_thresholds"])
    fast, reference = run_both(node, x)
    assert_close(fast, reference, PA_COMBINE_RTOL, "binary PALinear")


@pytest.mark.parametrize("n_thresholds", [3, 5])
@pytest.mark.parametrize("op", ["PAConv", "PALinear"])
def test_binary_code_gives_the_values_of_a_thermometer_code_with_equal_steps(n_thresholds, op):
    """Same thresholds, act_steps = [e] * N (thermometer) or e * 2^b (binary): the same layer,
    in fewer planes and fewer binary operations."""
    rng = np.random.default_rng(n_thresholds)
    kernel = (3, 3) if op == "PAConv" else (1, 1)
    binary = binary_node(rng, 6, 65, n_thresholds, kernel=kernel, weight_bases=4, op=op)
    # unsorted thresholds: q counts them, and the thermometer sum does too
    binary.params["act_thresholds"] = rng.normal(size=(n_thresholds, 65)).astype(np.float32)
    thermometer = Node(op, "thermometer", ["x"], ["y"], {k: v for k, v in binary.attrs.items() if k != "act_coding"},
                       dict(binary.params, act_steps=np.full(n_thresholds, binary.params["act_steps"][0], np.float32)))
    shape = (3, 65, 5, 6) if op == "PAConv" else (3, 65)
    x = with_threshold_ties(rng, rng.normal(size=shape).astype(np.float32), binary.params["act_thresholds"])
    fast_binary, reference_binary = run_both(binary, x)
    fast_thermometer, reference_thermometer = run_both(thermometer, x)
    assert_close(reference_binary, reference_thermometer, 1e-12, "binary vs thermometer reference")
    assert_close(fast_binary, fast_thermometer, PA_COMBINE_RTOL, "binary vs thermometer kernel")
    input_shape, output_shape = [(None,) + shape[1:]], [(None,) + fast_binary.shape[1:]]
    binary_cost = get_op(op).cost(binary, input_shape, output_shape)
    thermometer_cost = get_op(op).cost(thermometer, input_shape, output_shape)
    assert binary_cost.bops * n_thresholds == thermometer_cost.bops * binary_planes(n_thresholds)


@pytest.mark.parametrize("change,message", [
    (lambda n: n.attrs.update(act_coding="gray"), "act_coding 'gray' is not supported"),
    (lambda n: n.params.update(act_steps=np.full(5, 0.5, np.float32)), "act_steps"),
    (lambda n: n.params.update(act_steps=np.array([0.5, 1.0, 2.5], np.float32)), "e \\* 2\\^b"),
    (lambda n: n.params.update(act_thresholds=np.zeros((8, 4), np.float32)), "act_steps"),
])
def test_bad_binary_coding_is_refused_naming_the_node(change, message):
    node = binary_node(np.random.default_rng(0), 3, 4, 5)
    change(node)
    with pytest.raises(GraphError, match=f"node 'layer' \\(PAConv\\).*{message}"):
        get_op("PAConv").infer_shapes(node, [(None, 4, 5, 5)])


def test_old_nodes_without_act_coding_are_thermometer():
    rng = np.random.default_rng(0)
    node = random_pa_node(rng, 3, 4, act_bases=5)
    assert "act_coding" not in node.attrs
    assert get_op("PAConv").infer_shapes(node, [(None, 4, 5, 5)]) == [(None, 3, 5, 5)]
    assert get_op("PAConv").cost(node, [(None, 4, 5, 5)], [(None, 3, 5, 5)]).bops == 2 * 5 * 3 * 5 * 5 * 4 * 9


def residual_graph(rng, codings, channels=70):
    """x -> PAConv(relu) -> PAConv -> Add(x) -> Relu, the two convs in `codings`; x >= 0."""
    nodes = []
    for index, (coding, source, target) in enumerate(zip(codings, ["x", "r1"], ["c1", "c2"])):
        node = (binary_node(rng, channels, channels, 5, step=0.3 + 0.1 * index, pads=(1, 1, 1, 1))
                if coding == "binary" else random_pa_node(rng, channels, channels, act_bases=4, pads=(1, 1, 1, 1)))
        node.params["act_thresholds"] = np.sort(rng.uniform(0.0, 2.0, node.params["act_thresholds"].shape),
                                                axis=0).astype(np.float32)
        node.name, node.inputs, node.outputs = f"conv{index + 1}", [source], [target]
        nodes.append(node)
    nodes.insert(1, Node("Relu", "relu1", ["c1"], ["r1"]))
    nodes += [Node("Add", "add", ["c2", "x"], ["s"]), Node("Relu", "relu2", ["s"], ["y"])]
    return Graph([TensorInfo("x", (None, channels, 6, 5))], ["y"], nodes)


@pytest.mark.parametrize("codings", [("binary", "binary"), ("thermometer", "binary"), ("binary", "thermometer")])
def test_planes_handed_to_a_binary_reader_give_the_reference_outputs(codings):
    """conv -> relu -> conv -> add residual -> relu: after fusion, conv1 writes conv2's planes in
    conv2's code; the Session equals the float64 reference executor."""
    rng = np.random.default_rng(len(codings[0]) + 3 * len(codings[1]))
    graph = residual_graph(rng, codings)
    pack, producer, reader = lower(graph).nodes
    assert producer.config.output_layout.coding == codings[1] and reader.inputs[0] == producer.outputs[0]
    x = np.abs(rng.normal(size=(2, 70, 6, 5))).astype(np.float32)
    # Exact ties on the reader's thresholds are made by the producer's output; the planes it
    # writes must be those the reader packs from that float32 output.
    (planes,) = get_op("BinaryConv").make_kernel(producer)(get_op("PackPlanes").make_kernel(pack)([x]))
    (float_output,) = get_op("PAConv").make_kernel(fuse_epilogues(graph).nodes[0])([x])
    expected = pack_activations_reference(float_output, graph.nodes[2].params["act_thresholds"], (1, 1, 1, 1), 0.0,
                                          1, codings[1])
    np.testing.assert_array_equal(planes, expected)
    (y,) = Session(graph).run(["y"], {"x": x})
    assert_close(y, run_reference(graph, {"x": x})["y"], PA_COMBINE_RTOL, f"{codings} block")


def test_binary_coding_is_stored_in_the_pab_file_and_reported(tmp_path):
    rng = np.random.default_rng(5)
    graph = residual_graph(rng, ("thermometer", "binary"))
    save(graph, tmp_path / "model.pab")
    loaded_graph = load_graph(tmp_path / "model.pab")
    codings = [node.attrs.get("act_coding") for node in loaded_graph.nodes if node.op == "PAConv"]
    assert codings == [None, "binary"]
    rows = {row["name"]: row for row in model_report(loaded_graph)["layers"]}
    macs = 70 * 6 * 5 * 70 * 9
    assert (rows["conv1"]["kind"], rows["conv1"]["bops"]) == ("PA(2,4)", 2 * 4 * macs)
    assert (rows["conv2"]["kind"], rows["conv2"]["bops"]) == ("PA(2,5b)", 2 * 3 * macs)
    x = np.abs(rng.normal(size=(1, 70, 6, 5))).astype(np.float32)
    assert_close(Session(loaded_graph).run(["y"], {"x": x})[0], run_reference(graph, {"x": x})["y"],
                 PA_COMBINE_RTOL, "loaded")


# ---- converter: uniform activation grid, convert(act_coding="binary") ----------------------

@pytest.mark.parametrize("lowest_level", [None, 0.0])
@pytest.mark.parametrize("n_thresholds", [1, 3, 5])
def test_uniform_staircase_is_a_grid_no_worse_than_its_start_and_a_local_optimum(lowest_level, n_thresholds):
    from pabnn.converters.fitting import StaircaseFit, UniformStaircaseFit

    rng = np.random.default_rng(n_thresholds)
    values = rng.gamma(1.5, 1.0, size=4000) if lowest_level == 0.0 else rng.normal(size=4000)
    if lowest_level == 0.0:
        values[:1000] = 0.0  # the atom of a ReLU
    fit = UniformStaircaseFit(n_thresholds, lowest_level=lowest_level).fit(values)
    np.testing.assert_allclose(np.diff(fit.levels_), fit.step_, rtol=1e-12)
    np.testing.assert_allclose(fit.thresholds_, (fit.levels_[:-1] + fit.levels_[1:]) / 2, rtol=1e-12)
    if lowest_level is not None:
        assert fit.levels_[0] == lowest_level
    assert fit.mse_ == pytest.approx(np.mean((fit.transform(values) - values) ** 2), rel=1e-12)
    # The grid of the least-squares start (its lowest level and mean step) is never better.
    start = StaircaseFit(n_thresholds, lowest_level=lowest_level).fit(values).levels_
    step = (start[-1] - start[0]) / n_thresholds
    grid = start[0] + step * np.arange(n_thresholds + 1)
    start_mse = np.mean((grid[np.searchsorted(grid[:-1] + step / 2, values, side="right")] - values) ** 2)
    assert fit.mse_ <= start_mse * (1 + 1e-12)
    # Nudging the step does not lower the error: a local least-squares optimum.
    for factor in (0.98, 1.02):
        nudged = fit.lowest_ + fit.step_ * factor * np.arange(n_thresholds + 1)
        error = np.mean((nudged[np.searchsorted(nudged[:-1] + fit.step_ * factor / 2, values, side="right")]
                         - values) ** 2)
        assert error >= fit.mse_ * (1 - 1e-9)


@pytest.fixture(scope="module")
def binary_small_model():
    from small_models import calibration_images, small_onnx_model

    from pabnn.converters import convert

    return convert(small_onnx_model(), calibration=calibration_images(), weight_bases=2, act_bases=5,
                   act_coding="binary", method="selected", min_fan_in=1, progress=False)


def test_converted_binary_model_runs_equal_to_the_reference_executor(binary_small_model, tmp_path):
    from models import assert_engine_matches_reference_per_op
    from small_models import calibration_images

    graph = binary_small_model.graph
    pa_nodes = [node for node in graph.nodes if node.op in ("PAConv", "PALinear")]
    assert len(pa_nodes) == 3 and graph.metadata["converter"]["act_coding"] == "binary"
    for node in pa_nodes:
        assert node.attrs["act_coding"] == "binary"
        steps = node.params["act_steps"]
        np.testing.assert_array_equal(steps, binary_plane_steps(steps[0], 5))
        assert steps[0] > 0
    x = calibration_images(6, seed=7)
    assert_engine_matches_reference_per_op(graph, {"x": x})
    binary_small_model.save(tmp_path / "binary.pab")
    loaded = load_graph(tmp_path / "binary.pab")
    (y,) = Session(loaded).run(["y"], {"x": x})
    assert_close(y, run_reference(graph, {"x": x})["y"], 1e-5, "loaded binary model vs reference executor")
    # BOPs = M * B * MACs with B = 3 planes for N = 5.
    shapes = graph.infer_shapes()
    for row in model_report(loaded)["layers"]:
        node = next(n for n in loaded.nodes if n.name == row["name"])
        if node.op in ("PAConv", "PALinear"):
            out_elements = int(np.prod(shapes[node.outputs[0]][1:]))
            _, _, kh, kw, _ = node.params["weight_planes"].shape
            macs = out_elements * node.attrs["in_channels"] // node.attrs.get("group", 1) * kh * kw
            assert row["kind"] == "PA(2,5b)" and row["bops"] == 2 * 3 * macs


def test_binary_coding_of_a_converted_model_matches_its_uniform_fit(binary_small_model):
    """Each layer's Qa takes the levels of its reported uniform fit: lowest + e * q."""
    for fit, node in zip(binary_small_model.fits,
                         [n for n in binary_small_model.graph.nodes if n.op in ("PAConv", "PALinear")]):
        levels = np.asarray(fit["act_levels"])
        assert fit["act_coding"] == "binary"
        np.testing.assert_allclose(np.diff(levels), node.params["act_steps"][0], rtol=1e-6)
        assert node.params["act_lowest"][0] == np.float32(levels[0])


def test_convert_refuses_an_unknown_act_coding():
    from small_models import calibration_images, small_onnx_model

    from pabnn.converters import convert
    from pabnn.engine.errors import ConversionError

    with pytest.raises(ConversionError, match="act_coding must be one of"):
        convert(small_onnx_model(), calibration=calibration_images(4), act_coding="gray")


def test_cli_convert_act_coding_binary_and_report(tmp_path):
    import json

    import onnx
    from small_models import calibration_images, small_onnx_model
    from test_cli import assert_succeeded, run_cli

    onnx.save(small_onnx_model(), tmp_path / "small.onnx")
    np.save(tmp_path / "calib.npy", calibration_images(16))
    assert_succeeded(run_cli("convert", "small.onnx", "-o", "small.pab", "--calibration", "calib.npy",
                             "--weight-bases", 4, "--act-bases", 5, "--act-coding", "binary", "--method", "lloyd",
                             "--min-fan-in", 1, cwd=tmp_path))
    result = run_cli("report", "small.pab", "--json", cwd=tmp_path)
    assert_succeeded(result)
    rows = [row for row in json.loads(result.stdout)["layers"] if row["kind"] != "float"]
    assert [row["kind"] for row in rows] == ["PA(4,5b)"] * 3
    graph = load_graph(tmp_path / "small.pab")
    assert graph.metadata["converter"]["act_coding"] == "binary"
    assert all(node.params["act_steps"].shape == (3,) for node in graph.nodes if node.op in ("PAConv", "PALinear"))


def test_fine_tuning_refuses_binary_coded_layers():
    from small_models import calibration_images, small_onnx_model

    from pabnn.converters.torch import prepare
    from pabnn.engine.errors import ConversionError

    with pytest.raises(ConversionError, match="thermometer activation code only, found act_coding 'binary'"):
        prepare(small_onnx_model(), calibration=calibration_images(8), weight_bases=2, act_bases=3,
                act_coding="binary", method="lloyd")
