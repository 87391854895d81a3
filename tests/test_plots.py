"""engine/plots.py: `pabnn report --plot` and the panels behind it (`pabnn bench --plot` is run in
tests/test_bench.py). The pictures are checked as files (a PNG's signature and IHDR size, an SVG
that parses as XML), the plotted numbers against the report's own, in-process on a small model."""
import json
import struct
import sys
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from small_models import calibration_images, small_pa_graph

from pabnn.engine.cli import main
from pabnn.engine.pab_format import load_graph, save as save_graph
from pabnn.engine.plots import default_figure_size, profile_panels, report_panels, save_panels
from pabnn.engine.report import model_report

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk, which the PNG format puts first after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG: starts with {data[:8]!r}"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plots")
    save_graph(small_pa_graph(), folder / "model.pab")
    np.save(folder / "x.npy", calibration_images(8, seed=5))
    return folder


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_plot_is_a_png_of_the_figure_size(workspace, capsys):
    code, out, err = run(capsys, "report", workspace / "model.pab", "--json", "--plot", workspace / "report.png")
    assert code == 0, err
    report = json.loads(out)  # --json keeps stdout the report alone; the note goes to stderr
    assert "report.png" in err
    width, height = default_figure_size(report_panels(report))
    assert png_size(workspace / "report.png") == (round(100 * width), round(100 * height))


def test_save_panels_png_and_svg_at_the_asked_size(workspace):
    panels = report_panels(model_report(load_graph(workspace / "model.pab")))
    save_panels(panels, workspace / "asked.png", figure_size=(7, 3.5), dpi=60)
    assert png_size(workspace / "asked.png") == (420, 210)
    save_panels(panels, workspace / "asked.svg", figure_size=(7, 3.5), dpi=60)
    root = ElementTree.parse(workspace / "asked.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == "504pt" and root.get("height") == "252pt"  # 72 points per inch


def test_report_panels_hold_the_report_numbers(workspace, capsys):
    code, out, err = run(capsys, "report", workspace / "model.pab", "--json", "--calibration", workspace / "x.npy",
                         "--plot", workspace / "calibrated.svg")
    assert code == 0, err
    report = json.loads(out)
    bytes_panel, ops_panel, sqnr_panel = report_panels(report, report["layer_sqnr"])
    rows = [row for row in report["layers"] if row["params"] > 0]
    assert len(rows) >= 4 and bytes_panel["layers"] == ops_panel["layers"] == sqnr_panel["layers"]
    assert bytes_panel["layers"] == [f"{row['name']} [{row['kind']}]" for row in rows]
    assert bytes_panel["series"] == {"float32": [4 * row["params"] for row in rows],
                                     "stored in .pab": [row["stored_bytes"] for row in rows]}
    assert ops_panel["series"] == {"float32 model FLOPs": [row["float_flops"] for row in rows],
                                   "BOPs/64": [row["bops"] / 64 for row in rows],
                                   "FLOPs": [row["flops"] for row in rows]}
    sqnr = {row["layer"]: row["sqnr_db"] for row in report["layer_sqnr"]}
    binarized = [row["name"] for row in rows if row["kind"].startswith("PA")]
    assert binarized and set(binarized) <= set(sqnr)
    assert sqnr_panel["series"]["SQNR"] == [sqnr.get(row["name"]) for row in rows]
    assert ElementTree.parse(workspace / "calibrated.svg").getroot().tag.endswith("svg")


def test_profile_panels_hold_the_profile_times():
    profile = [{"name": "conv1", "kind": "float", "ms": 2.5}, {"name": "layer1.0.conv1", "kind": "PA(1,1)", "ms": 0.4}]
    result = {"network": "resnet18", "weight_bases": 1, "act_bases": 1, "act_coding": "thermometer",
              "threads": [{"threads": 1, "profile": profile},
                          {"threads": 2, "profile": [dict(profile[1], ms=0.25), dict(profile[0], ms=1.5)]}]}
    (panel,) = profile_panels([result])
    assert panel["layers"] == ["conv1 [float]", "layer1.0.conv1 [PA(1,1)]"]
    assert panel["series"] == {"1 thread": [2.5, 0.4], "2 threads": [1.5, 0.25]}
    assert "PA(1,1)" in panel["title"]


@pytest.mark.parametrize("name", ["report.jpg", "report", "report.png.txt"])
def test_a_bad_suffix_is_one_line_and_writes_nothing(workspace, capsys, name):
    before = sorted(path.name for path in workspace.iterdir())
    code, out, err = run(capsys, "report", workspace / "model.pab", "--plot", workspace / name)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "expected a file name ending in .png or .svg" in err
    assert sorted(path.name for path in workspace.iterdir()) == before


def test_an_existing_plot_needs_force(workspace, capsys):
    target = workspace / "kept.png"
    target.write_bytes(b"old")
    code, _, err = run(capsys, "report", workspace / "model.pab", "--plot", target)
    assert code == 1 and "--force" in err and target.read_bytes() == b"old"
    code, _, err = run(capsys, "report", workspace / "model.pab", "--plot", target, "--force")
    assert code == 0, err
    assert png_size(target)[0] > 0


def test_missing_matplotlib_is_one_line_naming_the_extra(workspace, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec reports for a missing package
    code, out, err = run(capsys, "report", workspace / "model.pab", "--plot", workspace / "none.png")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert 'pip install "pabnn[plot]"' in err
    assert not (workspace / "none.png").exists()
