"""Settings and case counts of the property-based fuzz tests (test_fuzz_*.py).

CI runs a small, fixed (derandomized) number of examples per test. For a larger, random run:

    PABNN_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz_pab.py tests/test_fuzz_onnx.py -p no:cacheprovider

Every case records its outcome with `record`; the totals are printed at the end of the pytest
run (tests/conftest.py calls `summary`).
"""
import collections
import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("PABNN_FUZZ_EXAMPLES", "0"))

_OUTCOMES = collections.defaultdict(collections.Counter)  # test name -> {outcome: count}


def fuzz_settings(ci_examples):
    """Hypothesis settings: ci_examples derandomized examples, or PABNN_FUZZ_EXAMPLES random ones."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )


def record(test, outcome):
    """Count one fuzz case of `test` that ended in `outcome` (for example "FormatError")."""
    _OUTCOMES[test][outcome] += 1


def summary():
    """Lines reporting how many cases each fuzz test ran and how they ended."""
    lines = []
    for test, counts in sorted(_OUTCOMES.items()):
        outcomes = ", ".join(f"{count} {outcome}" for outcome, count in counts.most_common())
        lines.append(f"{test}: {sum(counts.values())} cases ({outcomes})")
    if lines:
        total = sum(sum(counts.values()) for counts in _OUTCOMES.values())
        lines.append(f"total: {total} fuzz cases, each counted after its outcome passed the test's checks")
    return lines
