"""The GPU scripts run where only torch/numpy exist: smoke-run them on CPU, tiny sizes, and
prove they import no Ray, AnnData, scanpy or MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
FIT = SCRIPT.parent / "gpu_fit.py"


def _run_light(script: Path, argv: list[str]) -> None:
    """Run a benchmark script as the GPU box would, and fail if it pulled in a package that
    box does not have (Ray, AnnData, scanpy, MLflow)."""
    code = (
        f"import runpy, sys; sys.argv = {[script.stem, *argv]!r}; "
        f"runpy.run_path(r'{script}', run_name='__main__'); "
        "bad = [m for m in ('ray', 'anndata', 'scanpy', 'mlflow') if m in sys.modules]; "
        "print('HEAVY', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize("config,precision", [("default", "bf16"), ("contrastive", "auto")])
def test_gpu_check_smoke_on_cpu(tmp_path, config, precision):
    """It times cicl's own step (``TrainingPlan.step``) in the precision it is given: bf16
    autocast on the CPU too when asked, fp32 there for auto."""
    argv = (
        f"--device cpu --cells 3000 --genes 128 --batch 128 --steps 2 --warmup 1 --config {config}"
        f" --precision {precision}"
    )
    _run_light(SCRIPT, [*argv.split(), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    # the step timed is the config's: the count decoder's MLP, or the contrastive Transformer
    assert (res["config"], res["encoder"]) == (
        (config, "mlp") if config == "default" else (config, "transformer")
    )
    assert res["forward_dtype"] == ("bfloat16" if precision == "bf16" else "fp32")
    # every phase was timed and the step's FLOPs counted, the encoder's among them (how the
    # timings compare is the benchmark's to report: a shared 2-core CPU makes them noisy)
    for key in ("train_cells_per_s", "step_ms", "step_gflop", "embed_cells_per_s"):
        assert res[key] > 0, key
    assert 0 < res["encoder_flop_share"] <= 1
    assert (tmp_path / "gpu_check.md").read_text().startswith("| device")


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
    argv = "--device cpu --seeds 1 --seed-start 1 --dist-check --check-dataset biase"
    argv += " --set cluster.final_n_init=20"  # a variant's rows: its overrides are recorded
    _run_light(FIT, ["run", "--prep", str(prep), "--out", str(out), *argv.split()])
    extra = json.loads((out / "gpu_fit.json").read_text())
    assert extra["dist"]["backend"] == "gloo" and extra["dist"]["ari_dist_vs_plain"] == 1.0
    assert extra["overrides"] == {"cluster.final_n_init": 20}
    row = (out / "gpu_fit.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "biase" and row[3] == "1" and float(row[4]) > 0.5  # ARI floor, real labels
    md = (out / "gpu_fit.md").read_text()
    assert "| biase (56) |" in md and '`{"cluster.final_n_init": 20}`' in md and "(1-1)" in md
