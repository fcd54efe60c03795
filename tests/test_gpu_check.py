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


FIT = SCRIPT.parent / "gpu_fit.py"


def test_gpu_fit_prepares_losslessly_and_runs_without_anndata(data_dir, tmp_path):
    """``prepare`` (here) stores a real dataset's scaled matrix compactly and exactly (it
    asserts the round trip); ``run`` (the GPU box: torch/numpy/sklearn only) fits it, scores it
    and runs the distributed check through TorchDistComm on a one-rank gloo group on the CPU."""
    src = tmp_path / "data"
    src.mkdir()
    (src / "biase.h5ad").symlink_to(data_dir / "biase.h5ad")
    prep, out = tmp_path / "prep", tmp_path / "out"
    subprocess.run(
        [sys.executable, str(FIT), "prepare", "--data", str(src), "--out", str(prep)], check=True
    )
    assert (prep / "biase.npz").stat().st_size < 400_000
    code = (
        "import runpy, sys; "
        f"sys.argv = ['gpu_fit', 'run', '--prep', r'{prep}', '--out', r'{out}', '--device', "
        "'cpu', '--seeds', '1', '--dist-check', '--check-dataset', 'biase']; "
        f"runpy.run_path(r'{FIT}', run_name='__main__'); "
        "bad = [m for m in ('ray', 'anndata', 'scanpy', 'mlflow') if m in sys.modules]; "
        "print('HEAVY', bad)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in run.stdout
    extra = json.loads((out / "gpu_fit.json").read_text())
    assert extra["dist"]["backend"] == "gloo" and extra["dist"]["ari_dist_vs_plain"] == 1.0
    row = (out / "gpu_fit.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "biase" and float(row[4]) > 0.5  # ARI floor on the real labels
    assert "| biase (56) |" in (out / "gpu_fit.md").read_text()
