"""The README's tables are generated (benchmarks/readme_tables.py), never typed: they must match what
the stored runs and the current error messages give."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_tables_match_their_generator(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr + "\n-> run `python benchmarks/readme_tables.py`"
