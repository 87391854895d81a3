import os
import sys

# tests/ holds shared helpers (tolerances.py, models.py); make them importable as modules.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    """Print how many cases the fuzz tests tried (tests/fuzzing.py), when any ran."""
    fuzzing = sys.modules.get("fuzzing")
    lines = fuzzing.summary() if fuzzing is not None else []
    if lines:
        terminalreporter.section("pabnn fuzz cases")
        for line in lines:
            terminalreporter.write_line(line)
