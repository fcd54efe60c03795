"""Sweeps on atlases: the trials run on a random sample read from the file (never the file
whole), the best configuration is fitted on every cell streamed and logged under the sweep;
the PCA stays exact on small inputs and needs no float64 copy on large ones."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


class CountingFile(io.FileIO):
    """A file that counts the bytes read through it (h5py's file-object driver reads there)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_read = 0

    def readinto(self, b) -> int | None:
        n = super().readinto(b)
        self.bytes_read += n or 0
        return n

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def _bytes_read(path: Path, read) -> tuple[int, object]:
    with CountingFile(path, "r") as raw, h5py.File(raw, "r") as f:
        result = read(f)
        return raw.bytes_read, result


@pytest.fixture(scope="module")
def sorted_file(tmp_path_factory) -> tuple[Path, sp.csr_matrix, np.ndarray]:
    """20,000 cells stored sorted by type (as atlases are), X a contiguous CSR (no HDF5 chunks:
    reading a row reads that row's bytes only), and a bulky obs column nobody asks for."""
    from anndata.io import write_elem

    n, g = 20_000, 1000
    X = sp.random(n, g, density=0.1, format="csr", dtype=np.float32, random_state=0)
    X.data = np.ceil(X.data * 10)
    types = np.repeat(np.array(["a", "b", "c", "d"]), n // 4)
    path = tmp_path_factory.mktemp("atlas") / "sorted.h5ad"
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        x.attrs["shape"] = X.shape
        for part in ("data", "indices", "indptr"):
            x.create_dataset(part, data=getattr(X, part))
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(types), "note": [f"cell {i} " * 20 for i in range(n)]},
            index=[f"cell{i}" for i in range(n)],
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    return path, X, types


def test_sample_reads_its_rows_only_at_random_over_the_file(sorted_file):
    """`cicl tune --stream`'s reader: 300 of 20,000 cells cost a small share of X's bytes
    (reading X whole, as `cicl tune` did before, costs all of them: the control below), the
    rows are the file's, spread over a file sorted by type, and the same for the same seed."""
    from cicl.data.sample import read_sample

    path, X, types = sorted_file
    x_bytes = X.data.nbytes + X.indices.nbytes
    n_read, s = _bytes_read(path, lambda f: read_sample(f, 300, 7, obs_keys=("cell_type",)))
    assert n_read < 0.2 * x_bytes, (n_read, x_bytes)
    whole, _ = _bytes_read(path, lambda f: __import__("anndata").io.sparse_dataset(f["X"])[:])
    assert whole >= x_bytes  # the counter sees a whole read
    assert s.adata.shape == (300, 1000) and s.n_obs == 20_000
    assert (s.adata.X != X[s.rows]).nnz == 0
    assert list(s.adata.obs_names) == [f"cell{i}" for i in s.rows]
    assert list(s.adata.obs["cell_type"]) == list(types[s.rows])
    assert "note" not in s.adata.obs
    counts = s.adata.obs["cell_type"].value_counts()
    assert len(counts) == 4 and counts.min() > 50  # every quarter of the file is sampled
    again = read_sample(path, 300, 7)
    assert np.array_equal(again.rows, s.rows)
    assert not np.array_equal(read_sample(path, 300, 8).rows, s.rows)


def _exact_pca(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact PCA as `_pca` computed it before randomised SVD above 50,000 cells."""
    xc = x - x.mean(0, keepdims=True)
    u, s, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
    u, s, vt = u[:, :n], s[:n], vt[:n]
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(n)])
    signs[signs == 0] = 1
    return (u * s * signs).astype(np.float32), (vt.T * signs).astype(np.float32)


def test_pca_is_exact_on_small_inputs_and_lean_on_large_ones():
    """Small inputs (every shared set): bitwise the exact SVD as before. Above 50,000 cells a
    seeded randomised SVD: the same variances, and memory of about the matrix itself where
    the exact SVD's float64 copy and (cells, genes) U take five times it."""
    from cicl.data.preprocess import EXACT_PCA_MAX_CELLS, _pca

    rng = np.random.default_rng(0)
    small = rng.standard_normal((500, 60)).astype(np.float32)
    for got, want in zip(_pca(small, 10), _exact_pca(small, 10), strict=True):
        assert np.array_equal(got, want)

    n, g = EXACT_PCA_MAX_CELLS + 1, 200
    scale = np.arange(8, 0, -1, dtype=np.float32)
    x = (rng.standard_normal((n, 8), dtype=np.float32) * scale) @ rng.standard_normal(
        (8, g), dtype=np.float32
    )
    x += 0.1 * rng.standard_normal((n, g), dtype=np.float32)
    tracemalloc.start()
    pcs, comps = _pca(x, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.5 * x.nbytes, peak / x.nbytes
    xc = (x - x.mean(0)).astype(np.float64)
    eig = np.sort(np.linalg.eigvalsh(xc.T @ xc))[::-1][:10]  # exact variances, (g, g) only
    assert np.allclose((pcs.astype(np.float64) ** 2).sum(0)[:8], eig[:8], rtol=1e-3)
    assert np.array_equal(_pca(x, 10)[0], pcs)  # seeded


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, data_dir) -> Path:
    """A 3,000-cell simulated atlas (counts, obs['cell_type']) of 300 genes."""
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    like = data_dir / "pollen.h5ad"
    cmd = [sys.executable, "-m", "cicl.cli", "simulate", "--like", str(like), "--cells"]
    cmd += ["3000", "--genes", "300", "--out", str(path), "-q"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return path


def test_tune_streams_an_atlas(atlas, tmp_path):
    """`cicl tune --stream --sample-cells 300`: the trial runs on 300 cells; the best config
    is then fitted on all 3,000, streamed, into --out (cell names and labels for every row,
    no X), and logged as a FINISHED run under the sweep's parent run with its metrics."""
    import anndata as ad

    from cicl.tracking import default_mlflow_uri, mlflow_client

    root, out = tmp_path / "runs", tmp_path / "final.h5ad"
    cmd = [sys.executable, "-m", "cicl.cli", "tune", str(atlas), "--stream"]
    cmd += ["--sample-cells", "300", "--trials", "1", "--no-asha", "--space", "small"]
    cmd += ["--label-key", "cell_type", "--root", str(root), "--experiment", "atlas"]
    cmd += ["--out", str(out), "--json", "--set", "cluster.final_n_init=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["n_cells"] == 3000 and summary["sample_cells"] == 300

    labels = list((root / "tune" / "atlas" / "trials").glob("*/labels.npy"))
    assert labels and all(np.load(p).shape == (300,) for p in labels)

    with h5py.File(out, "r") as f:
        assert "X" not in f and "layers" not in f
    res, src = ad.read_h5ad(out), ad.read_h5ad(atlas, backed="r")
    assert list(res.obs_names) == list(src.obs_names)
    assert res.obs["cicl"].notna().all() and res.obsm["X_cicl"].shape[0] == 3000
    assert res.obs["cicl"].nunique() == summary["best_params"]["cluster.n_clusters"]

    client = mlflow_client(default_mlflow_uri(root))
    exp = client.get_experiment_by_name("atlas")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    final = client.get_run(summary["final"]["mlflow_run"])
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert final.data.tags["cicl.kind"] == "final" and final.info.status == "FINISHED"
    m = final.data.metrics
    assert m["final_n_clusters"] == summary["best_params"]["cluster.n_clusters"]
    assert {"final_seconds", "final_silhouette_pca", "final_objective", "final_ari"} <= set(m)
    assert final.data.params["n_cells"] == "3000" and final.data.params["sample_cells"] == "300"
    assert parent.data.params["sample_cells"] == "300"


def test_a_resumed_sweep_leaves_its_final_fit_alone(tmp_path, capsys):
    """The final fit's run is a child of the sweep's parent but no trial: closing the sweep
    again (``--resume``) neither tags it lost nor deletes it, finished or still running."""
    from types import SimpleNamespace

    from cicl.sweep import close_orphans
    from cicl.tracking import default_mlflow_uri, log_child_run, mlflow_client

    uri = default_mlflow_uri(tmp_path)
    c = mlflow_client(uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp).info.run_id
    done = log_child_run(
        uri,
        exp,
        parent,
        "final-t",
        params={"a": 1},
        history=[],
        final={"n_clusters": 3},
        files=[],
        tags={"cicl.kind": "final"},
    )
    tags = {"mlflow.parentRunId": parent, "cicl.kind": "final"}
    running = c.create_run(exp, tags=tags).info.run_id
    setup = SimpleNamespace(mlflow_uri=uri, experiment_id=exp, parent_run_id=parent)
    assert close_orphans(setup, []) == 0
    for run_id, status in ((done, "FINISHED"), (running, "RUNNING")):
        run = c.get_run(run_id)
        assert run.info.lifecycle_stage == "active" and run.info.status == status
        assert "cicl.lost" not in run.data.tags
    got = c.get_run(done)
    assert got.data.tags["mlflow.parentRunId"] == parent
    assert got.data.metrics["final_n_clusters"] == 3 and got.data.params["a"] == "1"
