"""`soarflow --help` answers without importing torch (it costs seconds on a busy machine)."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_help_does_not_import_torch():
    code = (
        "import sys; from soarflow.cli import main; rc = main(['--help']); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH 0") and "eval-shapes" in out.stdout


def test_lazy_exports_still_work():
    import soarflow

    assert soarflow.SOARConfig().num_aux >= 0 and callable(soarflow.sample_euler)
