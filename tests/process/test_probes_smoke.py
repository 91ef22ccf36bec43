"""scripts/jrouter-probes --quick against jrouter: a row per probe, and every one passes.

The script starts its own routers and peers (loopback only) and checks each
result against jrouter's documented expectation (docs/reliability.md); this
test reads its markdown table.  No test asserts a time.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBES = REPO_ROOT / "scripts" / "jrouter-probes"


def table_rows(markdown):
    """{probe name: [cells]} of the table's body rows."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].split("**")[1]] = cells
    return rows


def test_every_probe_has_a_row_and_jrouter_meets_every_expectation():
    """--quick --router jrouter: one table row per probe listed, each verdict "pass"."""
    listed = subprocess.run([sys.executable, str(PROBES), "--list"], capture_output=True,
                            text=True, timeout=60, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert len(names) >= 7, listed.stderr
    result = subprocess.run([sys.executable, str(PROBES), "--quick", "--router", "jrouter",
                             "--python", sys.executable], capture_output=True, text=True,
                            timeout=240, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    rows = table_rows(result.stdout)
    assert sorted(rows) == sorted(names), result.stderr
    failed = {name: cells[-1] for name, cells in rows.items() if cells[-1] != "pass"}
    assert not failed, failed
    assert all(cells[4] == "not run" for cells in rows.values())
    assert result.returncode == 0, result.stderr
