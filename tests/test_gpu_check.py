"""The GPU check script runs where only torch/numpy exist: smoke-run it on CPU, tiny sizes,
and prove it imports no Ray, AnnData, scanpy or MLflow."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(tmp_path):
    code = (
        "import runpy, sys; "
        f"sys.argv = ['gpu_check', '--device', 'cpu', '--cells', '3000', '--genes', '128', "
        f"'--batch', '128', '--steps', '2', '--warmup', '1', '--out', r'{tmp_path}']; "
        f"runpy.run_path(r'{SCRIPT}', run_name='__main__'); "
        "bad = [m for m in ('ray', 'anndata', 'scanpy', 'mlflow') if m in sys.modules]; "
        "print('HEAVY', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["train_cells_per_s"] > 0 and res["encoder_fwd_bwd_ms"] > 0
    assert res["step_ms"] >= res["encoder_fwd_bwd_ms"] * 0.5
    assert (tmp_path / "gpu_check.md").read_text().startswith("| device")
