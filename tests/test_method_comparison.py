"""examples/method_comparison.py on hand-made rows with known gaps."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import method_comparison  # noqa: E402


def row(network, method, bases, change, split="test"):
    float_top1 = 0.99
    return {"network": network, "method": method, "weight_bases": bases[0], "act_bases": bases[1],
            "split": split, "float_top1": float_top1, "pa_top1": float_top1 + change,
            "change": (float_top1 + change) - float_top1}


# a PA(1,1): lloyd and rounding tie for best, 0.2 ahead of the default.
# a PA(2,2): rounding 0.4 ahead of the default (outside 0.3).
# b PA(1,1): the default 0.4 ahead of every other method.
# b PA(2,2): rounding exactly 0.3 ahead (within).
ROWS = [row("a", "selected", (1, 1), -0.010), row("a", "lloyd", (1, 1), -0.008), row("a", "rounding", (1, 1), -0.008),
        row("a", "selected", (2, 2), -0.006), row("a", "lloyd", (2, 2), -0.009), row("a", "rounding", (2, 2), -0.002),
        row("b", "selected", (1, 1), 0.002), row("b", "lloyd", (1, 1), -0.002), row("b", "rounding", (1, 1), -0.002),
        row("b", "selected", (2, 2), -0.005), row("b", "rounding", (2, 2), -0.002)]


def test_compare_finds_the_best_other_method_ties_and_gaps():
    cells = method_comparison.compare(ROWS, default="selected")
    found = {(cell["network"], cell["weight_bases"]): cell for cell in cells}
    assert len(cells) == 4
    assert found[("a", 1)]["best_methods"] == ["lloyd", "rounding"]
    assert found[("a", 1)]["gap"] == pytest.approx(0.2)
    assert found[("a", 2)]["best_methods"] == ["rounding"] and found[("a", 2)]["gap"] == pytest.approx(0.4)
    assert found[("b", 1)]["best_methods"] == ["lloyd", "rounding"] and found[("b", 1)]["gap"] == pytest.approx(-0.4)
    assert found[("b", 1)]["default_change"] == pytest.approx(0.2)
    assert found[("b", 2)]["gap"] == pytest.approx(0.3)
    assert method_comparison.summary(cells, 0.3) == (
        "3 of 4 cells within 0.3 points of the best other method; largest gap +0.40 points (a PA(2,2), rounding)")


def test_cli_prints_a_table_and_summary_per_split(tmp_path, monkeypatch, capsys):
    validation = [dict(r, split="validation", change=0.0, pa_top1=r["float_top1"]) for r in ROWS]
    for name, rows in (("test.json", ROWS), ("validation.json", validation)):
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(sys, "argv", ["method_comparison.py", str(tmp_path / "test.json"),
                                      str(tmp_path / "validation.json")])
    method_comparison.main()
    printed = capsys.readouterr().out
    assert "| a | (1,1) | -1.0 | -0.8 `lloyd`, `rounding` | +0.20 | yes |" in printed
    assert "| a | (2,2) | -0.6 | -0.2 `rounding` | +0.40 | no |" in printed
    assert "| b | (2,2) | -0.5 | -0.2 `rounding` | +0.30 | yes |" in printed
    assert "test: 3 of 4 cells within 0.3 points" in printed
    assert "validation: 4 of 4 cells within 0.3 points" in printed


def test_two_rows_of_one_method_and_cell_are_refused():
    with pytest.raises(ValueError, match="two rows of 'lloyd' for a PA\\(1,1\\)"):
        method_comparison.compare(ROWS + [row("a", "lloyd", (1, 1), -0.001)], default="selected")


def test_held_out_scores_of_known_logits():
    import method_choice_held_out as held_out
    float_logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    same = held_out.held_out_scores(float_logits, float_logits.copy())
    assert same == {"kl": 0.0, "agreement": 1.0, "relative_error": 0.0}
    flipped = held_out.held_out_scores(float_logits, np.array([[0.0, 2.0], [0.0, 1.0]]))
    assert flipped["agreement"] == 0.5
    assert flipped["relative_error"] == pytest.approx(8.0 / 5.0)
    p, q = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum(), np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()
    assert flipped["kl"] == pytest.approx(np.sum(p * np.log(p / q)) / 2)


def test_held_out_report_takes_each_cell_s_preferred_method():
    """Cell a: rounding has the smaller KL, selected the better agreement; cell b: selected both."""
    import method_choice_held_out as held_out
    scores = [{"network": "a", "weight_bases": 1, "act_bases": 1, "method": "rounding", "kl": 0.1, "agreement": 0.9,
               "relative_error": 0.2},
              {"network": "a", "weight_bases": 1, "act_bases": 1, "method": "selected", "kl": 0.2, "agreement": 1.0,
               "relative_error": 0.1},
              {"network": "b", "weight_bases": 1, "act_bases": 1, "method": "rounding", "kl": 0.3, "agreement": 0.5,
               "relative_error": 0.3},
              {"network": "b", "weight_bases": 1, "act_bases": 1, "method": "selected", "kl": 0.2, "agreement": 0.6,
               "relative_error": 0.1}]
    results = [row(network, method, (1, 1), change, split) for split in ("validation", "test")
               for network, method, change in [("a", "rounding", -0.010), ("a", "selected", -0.030),
                                               ("b", "rounding", -0.050), ("b", "selected", -0.020)]]
    table = held_out.report(scores, results, default="selected").splitlines()
    cell = {(line.split(" | ")[0].strip("| "), line.split(" | ")[1]): line.split(" | ")[2] for line in table[2:]}
    # kl prefers rounding on a (-1.0) and selected on b (-2.0): mean -1.5; the default -2.5.
    assert cell["kl", "test"].startswith("-1.50 / -2.50")
    # agreement and relative error prefer selected on both cells: the default's own mean.
    assert cell["agreement", "validation"].startswith("-2.50 / -2.50")
    assert cell["relative_error", "test"].startswith("-2.50 / -2.50")
