"""The typed modules (mypy.ini's ``files``) pass mypy with the repository's settings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_typed_modules_pass_mypy():
    """`python -m mypy --config-file mypy.ini` finds no errors (mypy is a test dependency: never skipped)."""
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"mypy exit {run.returncode}:\n{run.stdout}{run.stderr}"
