"""Cost and size accounting of a Graph: per-layer rows and totals.

OPs follow the Bi-Real/ReActNet convention, OPs = FLOPs + BOPs/64, extended to integer layers:
an 8-bit multiply-accumulate of an IntConv/IntLinear counts as two operations, like a float MAC
(OPs = FLOPs + 2 * int MACs + BOPs/64). An int8 layer thus saves bytes (1-byte weights) and
cost per operation on integer hardware, not operation count. Counts are per sample.
Stored bytes are the exact sizes of the parameter blobs in the .pab file.
"""
from .ops import get_op


def pa_kind(node):
    """"PA(M,N)" of a PAConv/PALinear with M weight planes and N activation thresholds; "PA(M,Nb)"
    when its activations use the binary code (ceil(log2(N + 1)) planes, engine/ops/pa_conv.py)."""
    binary = "b" if node.attrs.get("act_coding", "thermometer") == "binary" else ""
    return f"PA({node.params['weight_planes'].shape[0]},{node.params['act_thresholds'].shape[0]}{binary})"


def layer_kind(node):
    if node.op in ("PAConv", "PALinear"):
        return pa_kind(node)
    if node.op in ("IntConv", "IntLinear"):
        return "int8"
    return "float"


def model_report(graph, file_bytes=None):
    """{"layers": [row...], "totals": {...}} for one sample of `graph` (at the example sizes of its
    symbolic input sizes, totals["example_sizes"])."""
    shapes = graph.infer_shapes()
    rows = []
    for node in graph.nodes:
        in_shapes = [shapes[name] for name in node.inputs]
        out_shapes = [shapes[name] for name in node.outputs]
        cost = get_op(node.op, node.name).cost(node, in_shapes, out_shapes)
        rows.append({
            "name": node.name,
            "op": node.op,
            "kind": layer_kind(node),
            "output_shape": list(out_shapes[0][1:]),
            "params": cost.float32_params,
            "float32_bytes": 4 * cost.float32_params,
            "stored_bytes": sum(int(p.nbytes) for p in node.params.values()),
            "bops": cost.bops,
            "int_macs": cost.int_macs,
            "flops": cost.flops,
            "float_flops": cost.float_flops,
        })
    totals = {key: sum(row[key] for row in rows) for key in
              ("params", "float32_bytes", "stored_bytes", "bops", "int_macs", "flops", "float_flops")}
    totals["ops"] = totals["flops"] + 2 * totals["int_macs"] + totals["bops"] / 64
    totals["memory_saving"] = totals["float32_bytes"] / max(totals["stored_bytes"], 1)
    totals["ops_saving"] = totals["float_flops"] / max(totals["ops"], 1)
    totals["binary_layers"] = sum(row["kind"].startswith("PA") for row in rows)
    totals["integer_layers"] = sum(row["kind"] == "int8" for row in rows)
    totals["example_sizes"] = graph.symbols()
    if file_bytes is not None:
        totals["file_bytes"] = int(file_bytes)
        totals["header_and_padding_bytes"] = int(file_bytes) - totals["stored_bytes"]
    return {"layers": rows, "totals": totals}


def _human(count):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}" if float(count).is_integer() else f"{count:.1f}"


def format_report(report):
    """The report as a fixed-width table with a totals section."""
    header = ("layer", "op", "kind", "output", "params", "fp32 B", "stored B", "BOPs", "int MACs", "FLOPs")
    lines = [[row["name"], row["op"], row["kind"], "x".join(map(str, row["output_shape"])),
              _human(row["params"]), _human(row["float32_bytes"]), _human(row["stored_bytes"]),
              _human(row["bops"]), _human(row["int_macs"]), _human(row["flops"])] for row in report["layers"]]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    text = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header] + lines]
    t = report["totals"]
    text += [
        "",
        f"binary layers: {t['binary_layers']} of {len(report['layers'])}"
        + (f", integer (int8) layers: {t['integer_layers']}" if t["integer_layers"] else ""),
        f"parameters: {t['stored_bytes']:,} bytes stored vs {t['float32_bytes']:,} bytes as float32 "
        f"({t['memory_saving']:.1f}x smaller)",
    ]
    if "file_bytes" in t:
        text.append(f"file on disk: {t['file_bytes']:,} bytes = parameters + {t['header_and_padding_bytes']:,} "
                    "bytes of header and alignment")
    sizes = t.get("example_sizes")
    at = f" at {', '.join(f'{name} {size}' for name, size in sizes.items())} (the input sizes are open)" if sizes else ""
    integer = f", int MACs {_human(t['int_macs'])}" if t["int_macs"] else ""
    formula = "FLOPs + 2 * int MACs + BOPs/64" if t["int_macs"] else "FLOPs + BOPs/64"
    text.append(f"per sample{at}: BOPs {_human(t['bops'])}{integer}, FLOPs {_human(t['flops'])}, "
                f"OPs = {formula} = {_human(t['ops'])} vs float model {_human(t['float_flops'])} FLOPs "
                f"({t['ops_saving']:.1f}x fewer)")
    return "\n".join(text)


