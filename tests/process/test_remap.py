"""scripts/jrouter-remap, the remap simulator, run as a process (it was in
tests/unit/test_policy.py; unit tests start no processes)."""

import json
import pathlib
import subprocess
import sys


def test_remap_simulator_figures():
    """jrouter-remap runs, its cross-checks pass, and its figures show each algorithm's promise."""
    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "jrouter-remap"
    out = subprocess.run([sys.executable, str(script), "--jids", "2000", "--max-n", "5", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {(r["algorithm"], r["n"]): r for r in json.loads(out)["rows"]}
    assert len(rows) == 3 * 4
    for n in range(2, 6):
        for algorithm in ("consistent", "slots"):
            row = rows[(algorithm, n)]
            assert row["others_moved"] == 0 and row["not_back_home"] == 0
            assert row["moved_on_leave"] <= 1 / n + 0.05
    assert 0.70 <= rows[("jabberd2", 4)]["moved_on_leave"] <= 0.80  # protocol §6.3: about (N-1)/N
    assert rows[("jabberd2", 4)]["others_moved"] > 0.4
