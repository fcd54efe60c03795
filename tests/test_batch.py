"""`--batch-key`: HVGs within batches and scanpy's ComBat before scaling. Checked on a real
dataset given a known, seeded batch effect (half the cells' genes scaled by random factors,
counts resampled), and on the input errors."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, silhouette_score

from cicl.cli import main
from cicl.config import PreprocessConfig
from cicl.data.preprocess import preprocess
from cicl.data.stream import H5adSource, _with_every_batch, fit_on_sample
from cicl.data.synthetic import synthetic_adata
from cicl.errors import InputError


@pytest.fixture(scope="module")
def baron_two_runs(data_dir):
    """baron_mouse1 as if sequenced in two runs: run2's genes shifted by exp(N(0, 0.8))."""
    a = ad.read_h5ad(data_dir / "baron_mouse1.h5ad")
    rng = np.random.default_rng(0)
    run2 = rng.integers(0, 2, a.n_obs) == 1
    x = a.X.toarray()
    factor = np.exp(rng.normal(0, 0.8, a.n_vars))
    x[run2] = rng.poisson(x[run2] * factor)
    out = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=a.obs.copy(), var=a.var.copy())
    out.obs["run"] = np.where(run2, "run2", "run1")
    return out


def test_combat_removes_the_batch_from_the_pca_and_keeps_the_cell_types(baron_two_runs):
    a = baron_two_runs
    plain = preprocess(a, PreprocessConfig())
    fixed = preprocess(a, PreprocessConfig(batch_key="run"))
    assert fixed.info["batch_key"] == "run" and fixed.info["n_batches"] == 2
    assert fixed.batch_slope is None  # the map only when asked (streaming, batch-key fits)
    assert "combat(key='run', 2 batches)" in fixed.info["steps"]
    assert any("batch_key='run'" in s for s in fixed.info["steps"])  # HVGs within batches
    sil_batch = [silhouette_score(p.pcs, a.obs["run"]) for p in (plain, fixed)]
    sil_type = [silhouette_score(p.pcs, a.obs["cell_type"]) for p in (plain, fixed)]
    assert sil_batch[0] > 0.02 and abs(sil_batch[1]) < 0.01, sil_batch  # measured 0.040 -> 0.003
    assert sil_type[1] > sil_type[0] - 0.02, sil_type


def test_cli_fit_with_batch_key_on_real_data(tmp_path, baron_two_runs, capsys):
    inp = tmp_path / "baron_runs.h5ad"
    baron_two_runs.write_h5ad(inp)
    out = tmp_path / "out.h5ad"
    args = ["fit", str(inp), "--out", str(out), "-k", "13", "--batch-key", "run"]
    assert main([*args, "--label-key", "cell_type", "--json", "--quiet", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["n_batches"] == 2 and "ComBat over 2 batches" in captured.err  # the summary
    res = ad.read_h5ad(out)
    assert res.uns["cicl"]["params"]["preprocess"]["batch_key"] == "run"
    assert res.uns["cicl"]["preprocess"]["n_batches"] == 2
    assert line["ari"] > 0.55  # 0.64 measured (0.50 without --batch-key, same seed)
    assert (
        abs(adjusted_rand_score(baron_two_runs.obs["run"], res.obs["cicl"])) < 0.02
    )  # not split by run


def _tiny(n=120):
    a = synthetic_adata(n_cells=n, n_genes=80, n_clusters=3, seed=0)
    a.obs["donor"] = np.where(np.arange(n) % 2 == 0, "d1", "d2")
    return a


@pytest.mark.parametrize(
    "change, msg",
    [
        (lambda a: None, "'nope' is not an obs column; available: cell_type, donor"),
        (lambda a: a.obs.__setitem__("nope", [None] + ["x"] * (a.n_obs - 1)), "missing for 1"),
        (
            lambda a: a.obs.__setitem__("nope", ["solo"] + ["x"] * (a.n_obs - 1)),
            "batch 'solo' has 1 cell; ComBat needs at least 2",
        ),
    ],
)
def test_bad_batch_key_is_refused(change, msg):
    a = _tiny()
    change(a)
    with pytest.raises(InputError, match=msg):
        preprocess(a, PreprocessConfig(batch_key="nope"))


def test_one_batch_is_a_warning_not_a_correction():
    a = _tiny()
    a.obs["donor"] = "d1"
    p = preprocess(a, PreprocessConfig(batch_key="donor"))
    assert not any(s.startswith("combat") for s in p.info["steps"])
    assert any("one batch" in w for w in p.info["warnings"])


def test_streamed_blocks_get_the_same_combat_as_in_memory(tmp_path, baron_two_runs):
    """ComBat fitted on the sample is applied to every block by the cell's batch: with the
    whole file as the sample, blocks equal the in-memory preprocessing."""
    path = tmp_path / "runs.h5ad"
    baron_two_runs.write_h5ad(path)
    cfg = PreprocessConfig(batch_key="run")
    t, _, n, _ = fit_on_sample(path, cfg, n_sample=10**9)
    full = preprocess(baron_two_runs, cfg)
    src = H5adSource(path, np.arange(100, n), t)
    x, pcs = src.read(np.arange(50, 400))
    assert np.allclose(x, full.x[150:500], atol=1e-4)
    assert np.allclose(pcs, full.pcs[150:500], atol=1e-3)
    # fitted on 300 cells only, it still takes the batch out of all cells' PCs
    t, _, _, _ = fit_on_sample(path, cfg, n_sample=300)
    _, pcs = H5adSource(path, np.arange(n), t).read(np.arange(n))
    t0, _, _, _ = fit_on_sample(path, PreprocessConfig(), n_sample=300)
    _, pcs0 = H5adSource(path, np.arange(n), t0).read(np.arange(n))
    runs = baron_two_runs.obs["run"]
    assert silhouette_score(pcs, runs) < 0.5 * silhouette_score(pcs0, runs)  # 0.007 vs 0.024


def test_sample_has_every_batch():
    codes = np.r_[np.zeros(1000, int), np.ones(3, int), np.full(200, 2)]
    rows = np.arange(0, 1000, 10)  # none of batches 1 and 2
    got = _with_every_batch(rows, codes, np.random.default_rng(0), per_batch=50)
    assert np.bincount(codes[got]).tolist() == [100, 3, 50]
    assert (np.diff(got) > 0).all()


def test_cli_streamed_fit_with_batch_key(tmp_path, baron_two_runs, capsys):
    inp = tmp_path / "runs.h5ad"
    baron_two_runs.write_h5ad(inp)
    out = tmp_path / "out.h5ad"
    args = ["fit", str(inp), "--out", str(out), "-k", "13", "--stream", "--quiet", "--json"]
    assert main([*args, "--batch-key", "run", "--label-key", "cell_type"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = ad.read_h5ad(out)
    assert line["streamed"] and res.uns["cicl"]["preprocess"]["n_batches"] == 2
    assert line["ari"] > 0.5
    assert abs(adjusted_rand_score(baron_two_runs.obs["run"], res.obs["cicl"])) < 0.02
    out.unlink()
    assert main([*args, "--batch-key", "nope"]) == 2
    assert "'nope' is not an obs column" in capsys.readouterr().err and not out.exists()
    assert main(["fit", str(inp), "--out", str(out), "--batch-key", "nope"]) == 2
    assert "'nope' is not an obs column" in capsys.readouterr().err and not out.exists()


def test_python_api_takes_batch_key(tiny_cfg):
    import cicl

    a = _tiny()
    cicl.fit(a, 3, config=tiny_cfg, batch_key="donor", progress=False)
    assert "combat(key='donor', 2 batches)" in a.uns["cicl"]["preprocess"]["steps"]
    assert a.uns["cicl"]["params"]["preprocess"]["batch_key"] == "donor"


def test_combat_map_from_batch_moments_is_exact_on_sparse_input():
    """The per-batch affine map is recovered from means and variances alone (no dense copy),
    for sparse input; a gene constant within a batch keeps slope 1."""
    from cicl.data.preprocess import _affine_per_batch, _batch_moments

    rng = np.random.default_rng(0)
    dense = sp.random(300, 6, density=0.4, random_state=1, dtype=np.float32).toarray()
    dense[:, 5] = 0.0  # constant everywhere
    x = sp.csr_matrix(dense)
    codes = rng.integers(0, 3, 300)
    slope, shift = rng.uniform(0.5, 2, (3, 6)), rng.normal(0, 1, (3, 6))
    after = x.toarray() * slope[codes] + shift[codes]
    names, s_got, t_got = _affine_per_batch(
        _batch_moments(x, codes, 3), _batch_moments(after, codes, 3), np.array(["a", "b", "c"])
    )
    assert names.tolist() == ["a", "b", "c"]
    assert np.allclose(s_got[:, :5], slope[:, :5], atol=1e-4) and np.all(s_got[:, 5] == 1)
    assert np.allclose(t_got, shift, atol=1e-4)
