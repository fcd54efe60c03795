"""`cicl simulate` scale-ups (issue 43): resampled real cells, type proportions, row order."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from cicl.cli import main
from cicl.data.simulate import simulate

GENES = 500


def _lognorm(X) -> np.ndarray:
    X = np.asarray(X.todense() if hasattr(X, "todense") else X, dtype=float)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)


@pytest.fixture(scope="module")
def pollen(data_dir, tmp_path_factory):
    """Pollen with a batch column: one type all in batch 'solo', the rest alternating."""
    a = ad.read_h5ad(data_dir / "pollen.h5ad")
    lone = a.obs["cell_type"].astype(str).value_counts().index[-1]
    b = np.where(np.arange(a.n_obs) % 2, "b1", "b0").astype(object)
    b[(a.obs["cell_type"].astype(str) == lone).to_numpy()] = "solo"
    a.obs["batch"] = pd.Categorical(b)
    path = tmp_path_factory.mktemp("real") / "pollen_b.h5ad"
    a.write_h5ad(path)
    return path, a, lone


@pytest.fixture(scope="module")
def resampled(pollen, tmp_path_factory):
    """Sorted by batch then type, written in 700-row chunks (5 chunks)."""
    path, _, _ = pollen
    out = tmp_path_factory.mktemp("sim") / "atlas.h5ad"
    simulate(
        path, 3000, out, n_genes=GENES, seed=3, chunk=700, mode="resample", order="sorted",
        batch_key="batch",
    )  # fmt: skip
    return ad.read_h5ad(out)


def test_resampled_cells_classify_as_their_type(pollen, resampled):
    """A nearest-centroid classifier fitted on the real cells labels the simulated cells
    with their true type (fails when rows and obs come apart, e.g. chunks out of order)."""
    _, real, _ = pollen
    real = real[:, resampled.var_names]
    types = list(resampled.obs["cell_type"].cat.categories)
    x = _lognorm(real.X)
    lab = real.obs["cell_type"].astype(str).to_numpy()
    cent = np.stack([x[lab == t].mean(0) for t in types])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    s = _lognorm(resampled.X)
    pred = np.asarray(types)[np.argmax(s @ cent.T, axis=1)]
    assert (pred == resampled.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9


def test_each_cell_is_a_thinned_real_cell_of_its_type_and_batch(pollen, resampled):
    """Every simulated cell is <= (gene by gene) some real cell of the same type and batch,
    and equal to none: thinned, not copied, not a fitted blob (fails in nb mode)."""
    _, real, _ = pollen
    r = np.asarray(real[:, resampled.var_names].X.todense())
    s = np.asarray(resampled.X.todense())
    rt, st = real.obs["cell_type"].astype(str).to_numpy(), resampled.obs["cell_type"].astype(str)
    rb, sb = real.obs["batch"].astype(str).to_numpy(), resampled.obs["batch"].astype(str)
    for (t, b), rows in pd.DataFrame({"t": st, "b": sb}).groupby(["t", "b"]).indices.items():
        pool = r[(rt == t) & (rb == b)]
        assert len(pool), (t, b)
        below = (s[rows][:, None, :] <= pool[None, :, :]).all(2)
        equal = (s[rows][:, None, :] == pool[None, :, :]).all(2)
        assert below.any(1).all() and not equal.any(), (t, b)
    lib_ratio = np.median(s.sum(1)) / np.median(r.sum(1))  # thinned to 0.6-0.9
    assert 0.5 < lib_ratio < 0.95


def test_sorted_rows_run_by_batch_then_type_and_keep_the_batch(pollen, resampled):
    _, real, lone = pollen
    b = resampled.obs["batch"].cat.codes.to_numpy().astype(int)
    t = resampled.obs["cell_type"].cat.codes.to_numpy()
    key = b * 1000 + t
    assert (np.diff(key) >= 0).all()
    lone_rows = resampled.obs["cell_type"].astype(str) == lone
    assert (resampled.obs["batch"][lone_rows] == "solo").all()
    assert set(resampled.obs["batch"][~lone_rows]) == {"b0", "b1"}
    rec = resampled.uns["simulate"]
    assert rec["order"] == "sorted" and rec["mode"] == "resample" and rec["batch_key"] == "batch"
    assert resampled.X.format == "csr" and resampled.X.dtype == np.float32
    assert resampled.shape == (3000, GENES)


@pytest.mark.parametrize("mode", ["nb", "resample"])
def test_zipf_proportions_are_a_long_tail_with_a_rare_last_type(data_dir, tmp_path, mode):
    out = tmp_path / "z.h5ad"
    like = data_dir / "cite_cbmc.h5ad"
    simulate(like, 5000, out, n_genes=200, mode=mode, proportions="zipf")
    a = ad.read_h5ad(out)
    real = ad.read_h5ad(like).obs["cell_type"].astype(str).value_counts()  # most frequent first
    assert len(real) >= 10
    share = a.obs["cell_type"].astype(str).value_counts(normalize=True).reindex(real.index)
    assert share.notna().all()
    assert 0.0005 <= share.iloc[-1] <= 0.005
    assert (np.diff(share.to_numpy()) <= 0).all()  # ordered like the real frequencies
    rec = a.uns["simulate"]
    assert rec["proportions"] == "zipf" and rec["zipf_exponent"] > 0
    assert abs(rec["share"].sum() - 1) < 1e-9 and rec["cells"].sum() == 5000
    got = pd.Series(rec["cells"], index=rec["types"]).reindex(share.index)
    assert np.allclose(got, share * 5000)


def test_equal_and_real_proportions(pollen, tmp_path):
    path, real, _ = pollen
    for rule in ("equal", "real"):
        out = tmp_path / f"{rule}.h5ad"
        simulate(path, 1100, out, n_genes=100, mode="resample", proportions=rule)
        n = ad.read_h5ad(out).obs["cell_type"].astype(str).value_counts()
        want = 1100 * real.obs["cell_type"].astype(str).value_counts(normalize=True)
        want = want if rule == "real" else want * 0 + 100
        assert (abs(n.reindex(want.index) - want) < 1).all(), rule


def test_shuffled_rows_are_not_sorted_and_same_seed_same_file(pollen, tmp_path):
    path = pollen[0]
    files = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        files.append(tmp_path / f"{name}.h5ad")
        simulate(path, 2000, files[-1], n_genes=200, seed=seed, chunk=600, mode="resample")
    a, b, c = (ad.read_h5ad(f) for f in files)
    codes = a.obs["cell_type"].cat.codes.to_numpy()
    assert (np.diff(codes) < 0).any() and a.uns["simulate"]["order"] == "shuffled"
    for part in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(a.X, part), getattr(b.X, part))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns["simulate"]["seed"] == 5 and (a.X != c.X).nnz > 0


def test_cli_resample_zipf_sorted(pollen, tmp_path, capsys):
    out = tmp_path / "cli.h5ad"
    argv = ["simulate", "--like", str(pollen[0]), "--cells", "1500", "--out", str(out)]
    argv += ["--genes", "100", "--mode", "resample", "--proportions", "zipf", "--order", "sorted"]
    assert main([*argv, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "zipf proportions (Zipf exponent" in printed and "%" in printed
    a = ad.read_h5ad(out)
    assert (np.diff(a.obs["cell_type"].cat.codes.to_numpy()) >= 0).all()
    with h5py.File(out) as f:
        assert f["uns/simulate/mode"][()] == b"resample"


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--mode", "blob"], "--mode must be one of nb, resample"),
        (["--proportions", "pareto"], "--proportions must be one of real, equal, zipf"),
        (["--order", "random"], "--order must be one of shuffled, sorted"),
        (["--batch-key", "donor"], "--batch-key 'donor' is not an obs column"),
        (["--batch-key", "cell_type"], "--batch-key may not be 'cell_type'"),
    ],
)
def test_cli_refuses_bad_options_before_work(pollen, tmp_path, capsys, extra, msg):
    out = tmp_path / "x.h5ad"
    argv = ["simulate", "--like", str(pollen[0]), "--cells", "100", "--out", str(out), *extra]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert msg in err, err
    assert not out.exists() and not list(tmp_path.glob(".x.h5ad*"))


def test_mixed_cells_are_of_their_type_and_not_copies(pollen, tmp_path):
    """``mix``: every cell is two real cells of its type, thinned and summed: it classifies as
    its type, and 3,000 cells from pollen's 301 have more than twice as many distinct sets of
    20 most expressed genes as resampled ones (2,340 vs 698: ~10 thinned copies of a cell
    share theirs)."""
    path, real, _ = pollen
    out = simulate(path, 3000, tmp_path / "mix.h5ad", n_genes=GENES, seed=3, mode="mix")
    a = ad.read_h5ad(out)
    types = list(a.obs["cell_type"].cat.categories)
    r = real[:, a.var_names]
    x, lab = _lognorm(r.X), r.obs["cell_type"].astype(str).to_numpy()
    cent = np.stack([x[lab == t].mean(0) for t in types])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    pred = np.asarray(types)[np.argmax(_lognorm(a.X) @ cent.T, axis=1)]
    assert (pred == a.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9
    assert a.uns["simulate"]["mode"] == "mix"

    def signatures(X) -> set:
        d = np.asarray(X.todense())
        return {tuple(np.sort(np.argsort(-row)[:20])) for row in d}

    resampled = simulate(path, 3000, tmp_path / "re.h5ad", n_genes=GENES, seed=3, mode="resample")
    assert len(signatures(a.X)) > 2 * len(signatures(ad.read_h5ad(resampled).X))
