"""Speed of pabnn's LRN kernel (engine/ops/lrn.py) against ONNX Runtime's LRN in the same run, on
the LRN inputs of AlexNet ([1, 96, 55, 55] and [1, 256, 27, 27], size 5). Both run one thread and
alternate for --repeats rounds; medians are printed, with the largest difference of the outputs.

    pip install -e ".[test]"   # onnxruntime
    python examples/bench_lrn.py [--repeats 31] [--batch 1]
"""
import argparse
import time

import numpy as np
import onnxruntime
from onnx import TensorProto, helper

from pabnn.converters import import_onnx
from pabnn.engine import Session

SHAPES = [(96, 55, 55), (256, 27, 27)]


def lrn_model(shape):
    """One LRN (AlexNet's attributes) at opset 9, input [N, *shape]."""
    node = helper.make_node("LRN", ["x"], ["y"], name="lrn", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    graph = helper.make_graph([node], "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    for shape in SHAPES:
        model = lrn_model(shape)
        x = (10 * np.random.default_rng(0).standard_normal((args.batch, *shape))).astype(np.float32)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        runtime = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session = Session(import_onnx(model), threads=1)
        times = {"pabnn": [], "onnxruntime": []}
        runs = {"pabnn": lambda: session.run(None, {"x": x})[0], "onnxruntime": lambda: runtime.run(None, {"x": x})[0]}
        for run in runs.values():
            run()  # compile / warm up
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        pabnn_ms, runtime_ms = (1e3 * float(np.median(times[name])) for name in runs)
        difference = float(np.max(np.abs(runs["pabnn"]() - runs["onnxruntime"]())))
        print(f"LRN [{args.batch}, {', '.join(map(str, shape))}] size 5, 1 thread: pabnn {pabnn_ms:.2f} ms, "
              f"ONNX Runtime {runtime_ms:.2f} ms, pabnn/ONNX Runtime {pabnn_ms / runtime_ms:.2f}; "
              f"max |difference| {difference:.2g}")


if __name__ == "__main__":
    main()
