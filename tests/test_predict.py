"""`cicl.predict` / `cicl predict`: new cells mapped onto a fitted reference, no refitting."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import cicl
from cicl.cli import main
from cicl.data.synthetic import synthetic_adata


@pytest.fixture(scope="module")
def pollen_split(data_dir, tmp_path_factory):
    """pollen: 70 % of the cells fitted (default config, true K) and written as a reference
    .h5ad; the other 30 % held out."""
    a = ad.read_h5ad(data_dir / "pollen.h5ad")
    held = np.random.default_rng(0).random(a.n_obs) < 0.3
    ref, query = a[~held].copy(), a[held].copy()
    cicl.fit(ref, 11, progress=False)
    path = tmp_path_factory.mktemp("ref") / "ref.h5ad"
    ref.write_h5ad(path)
    return ref, query, path


def test_reference_cells_get_their_own_labels_back(pollen_split):
    ref, _, path = pollen_split
    again = ref.copy()
    del again.obs["cicl"], again.obsm["X_cicl"], again.uns["cicl"]
    cicl.predict(again, path)  # from the file: the stored model survives the h5ad round trip
    assert np.array_equal(again.obs["cicl"].to_numpy(), ref.obs["cicl"].to_numpy())
    assert np.allclose(again.obsm["X_cicl"], ref.obsm["X_cicl"], atol=1e-4)
    assert again.obs["cicl"].cat.categories.tolist() == ref.obs["cicl"].cat.categories.tolist()
    # confidence: Student's t probability of the assigned cluster, from the written embedding
    # and the reference's centroids, on the fit's per-cluster metric (each cluster's whitened
    # distance squared plus its log-determinant's excess over the smallest)
    import torch

    from cicl.model.modules import student_t_q

    m = ref.uns["cicl"]["model"]["metric"]
    w, logdet = np.asarray(m["whiten"]), np.asarray(m["logdet"])
    h, c = again.obsm["X_cicl"].astype(np.float64), ref.uns["cicl"]["centroids"]
    d2 = np.stack(
        [(((h - c[j]) @ w[j]) ** 2).sum(1) + logdet[j] - logdet.min() for j in range(len(c))], 1
    )
    q = student_t_q(torch.from_numpy(d2), 1.0).numpy()
    assert np.allclose(again.obs["cicl_confidence"].to_numpy(), q.max(1), atol=1e-5)
    assert (q.argmax(1).astype(str) == again.obs["cicl"].to_numpy()).all()
    # distance percentile: a reference cell's rank among its cluster's cells by distance to
    # the centroid in the encoder's block (101 stored quantiles: within one percentile point)
    dims = int(ref.uns["cicl"]["model"]["dist_dims"])
    h, c = ref.obsm["X_cicl"][:, :dims], ref.uns["cicl"]["centroids"][:, :dims]
    lab = ref.obs["cicl"].cat.codes.to_numpy()
    d = np.linalg.norm(h - c[lab], axis=1)
    pct = again.obs["cicl_dist_pct"].to_numpy()
    for k in np.unique(lab):
        m = lab == k
        if m.sum() < 2:
            continue
        rank = (d[m][:, None] > d[m][None, :]).sum(1) + (d[m][:, None] == d[m][None, :]).sum(1) - 1
        assert np.abs(pct[m] - 100 * rank / (m.sum() - 1)).max() <= 1.0 + 1e-3
    assert again.uns["cicl"]["n_cells_atypical"] == int((pct > 99).sum())


def test_held_out_cells_are_clustered_as_well_as_the_fitted_ones(pollen_split):
    ref, query, _ = pollen_split
    with pytest.warns(UserWarning, match="clusters are small"):  # pollen: ~16 cells each
        out = cicl.predict(query, ref, key_added="mapped", copy=True)
    assert "mapped" not in query.obs  # copy=True leaves the input alone
    fitted = adjusted_rand_score(ref.obs["cell_type"], ref.obs["cicl"])
    mapped = adjusted_rand_score(out.obs["cell_type"], out.obs["mapped"])
    assert mapped > 0.8 and mapped > fitted - 0.1, (fitted, mapped)
    assert out.uns["mapped"]["n_genes_missing"] == 0
    pct = out.obs["mapped_dist_pct"].to_numpy()
    assert ((pct >= 0) & (pct <= 100)).all()
    assert out.uns["mapped"]["n_cells_atypical"] == int((pct > 99).sum())


def test_models_without_distance_quantiles_still_map(pollen_split):
    """References written before the distance table existed: labels as before, no
    percentile column and no count of atypical cells."""
    ref, query, _ = pollen_split
    old = ref.copy()
    model = dict(old.uns["cicl"]["model"])
    for f in ("dist_quantiles", "dist_dims", "cluster_sizes"):
        del model[f]
    old.uns["cicl"]["model"] = model
    stale = query.copy()
    stale.obs["cicl_dist_pct"] = 1.0  # from an earlier mapping: must not survive this one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no small-cluster warning: nothing to warn about
        out = cicl.predict(stale, old, copy=True)
    assert "cicl_dist_pct" not in out.obs and "n_cells_atypical" not in out.uns["cicl"]
    new = cicl.predict(query, ref, copy=True)
    assert np.array_equal(out.obs["cicl"].to_numpy(), new.obs["cicl"].to_numpy())


def test_distance_percentiles_of_new_cells_of_known_types_are_calibrated():
    # clusters of ~200 cells: held-out cells of the same types should sit where the
    # reference's own cells do (median near 50, about 1 % beyond the 99th percentile)
    syn = synthetic_adata(n_cells=900, n_genes=200, n_clusters=3, seed=0)
    ref, new = syn[:600].copy(), syn[600:].copy()
    cicl.fit(ref, 3, config=cicl.load_config(None, {"train.epochs": 5}), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # large clusters: no small-reference warning
        cicl.predict(new, ref)
    pct = new.obs["cicl_dist_pct"].to_numpy()
    assert 35 < np.median(pct) < 65 and np.mean(pct > 99) < 0.06, (np.median(pct), pct.max())


def test_genes_are_matched_by_name(pollen_split):
    ref, query, _ = pollen_split
    base = cicl.predict(query, ref, copy=True).obs["cicl"].to_numpy()
    rng = np.random.default_rng(1)
    shuffled = query[:, rng.permutation(query.n_vars)].copy()
    assert np.array_equal(cicl.predict(shuffled, ref, copy=True).obs["cicl"].to_numpy(), base)
    fewer = query[:, np.sort(rng.permutation(query.n_vars)[: int(0.9 * query.n_vars)])].copy()
    with pytest.warns(UserWarning, match="set to the reference mean"):
        part = cicl.predict(fewer, ref, copy=True)
    assert part.uns["cicl"]["n_genes_missing"] > 0
    assert np.mean(part.obs["cicl"].to_numpy() == base) > 0.9


def test_log_normalised_objects_are_fitted_and_mapped_from_their_counts(pollen_split):
    """X log-normalised with the counts in layers["counts"] (scanpy's usual layout): ``fit``
    and ``predict`` read the counts, so labels equal those from counts in X."""
    import scanpy as sc

    ref, query, _ = pollen_split

    def layered(a: ad.AnnData) -> ad.AnnData:
        b = ad.AnnData(X=a.X.copy(), obs=a.obs[["cell_type"]].copy(), var=a.var.copy())
        b.layers["counts"] = a.X.copy()
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        return b

    b = layered(ref)
    cicl.fit(b, 11, progress=False)
    assert np.array_equal(b.obs["cicl"].to_numpy(), ref.obs["cicl"].to_numpy())
    pre = b.uns["cicl"]["preprocess"]
    assert (pre["values"], pre["matrix"]) == ("counts", "layers['counts']")
    assert b.uns["cicl"]["decoder"] == "nb"
    q = layered(query)
    out = cicl.predict(q, ref, copy=True)
    assert out.uns["cicl"]["matrix"] == "layers['counts']"
    base = cicl.predict(query, ref, copy=True)
    assert np.array_equal(out.obs["cicl"].to_numpy(), base.obs["cicl"].to_numpy())


def test_predict_refuses_what_it_cannot_map(pollen_split, data_dir):
    ref, query, _ = pollen_split
    renamed = query.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(cicl.InputError, match="genes are in the new cells"):
        cicl.predict(renamed, ref)
    scaled = query.copy()
    scaled.X = np.asarray(scaled.X.todense()) - 1.0
    with pytest.raises(cicl.InputError, match="same form"):
        cicl.predict(scaled, ref)
    with pytest.raises(cicl.InputError, match="not fitted by cicl"):
        cicl.predict(query, ad.read_h5ad(data_dir / "biase.h5ad"))
    with pytest.raises(cicl.InputError, match="would replace its fit"):
        cicl.predict(ref, ref)
    mapped = cicl.predict(query, ref, copy=True)
    with pytest.raises(cicl.InputError, match="a `cicl predict` output"):
        cicl.predict(query, mapped)
    assert "cicl" not in query.obs


def test_batch_corrected_reference(tiny_cfg):
    a = synthetic_adata(n_cells=200, n_genes=100, n_clusters=3, seed=2)
    a.obs["run"] = np.where(np.arange(a.n_obs) % 2 == 0, "r1", "r2")
    cicl.fit(a, 3, config=tiny_cfg, batch_key="run", progress=False)
    assert list(a.uns["cicl"]["model"]["batch_names"]) == ["r1", "r2"]
    q = a.copy()
    del q.obs["cicl"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every cell is in a reference batch: no warning
        cicl.predict(q, a, key_added="p")
    assert q.uns["p"]["n_cells_uncorrected"] == 0
    assert np.array_equal(q.obs["p"].to_numpy(), a.obs["cicl"].to_numpy())
    q.obs["run"] = "new"
    with pytest.warns(UserWarning, match="200 cells are not in a batch"):
        cicl.predict(q, a, key_added="p")
    assert q.uns["p"]["n_cells_uncorrected"] == 200


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_predict(tmp_path, tiny_cfg, capsys):
    syn = synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1)
    inp, cfg = tmp_path / "in.h5ad", tmp_path / "cfg.yaml"
    syn.write_h5ad(inp)
    tiny_cfg.to_yaml(cfg)
    ref = tmp_path / "ref.h5ad"
    rc, _, _ = _run(capsys, ["fit", str(inp), "--out", str(ref), "-k", "3", "-c", str(cfg)])
    assert rc == 0
    new = tmp_path / "new.h5ad"
    syn[:40].copy().write_h5ad(new)
    out = tmp_path / "pred.h5ad"
    argv = ["predict", str(new), "--reference", str(ref), "--out", str(out)]
    rc, stdout, err = _run(capsys, argv + ["--label-key", "cell_type", "--json"])
    assert rc == 0, err
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["n_cells"] == 40 and r["n_clusters"] == 3 and r["n_genes_missing"] == 0
    assert {"ari", "nmi", "median_confidence", "seconds", "output"} <= set(r)
    assert "assigned to the reference's 3 clusters" in err
    p = ad.read_h5ad(out)
    fitted = ad.read_h5ad(ref).obs["cicl"].to_numpy()[:40]
    assert np.array_equal(p.obs["cicl"].to_numpy(), fitted)
    assert "cicl_confidence" in p.obs and p.obsm["X_cicl"].shape[0] == 40
    assert "cicl_dist_pct" in p.obs and r["n_cells_atypical"] == int(
        (p.obs["cicl_dist_pct"] > 99).sum()
    )
    assert "possibly states the reference lacks" in err

    # bad input: one line, exit 2, nothing written or overwritten
    before = out.read_bytes()
    for extra, msg in [
        ([], "already exists"),
        (["--force", "--key", "other"], "no uns['other']"),
        (["--force", "--label-key", "nope"], "is not an obs column"),
    ]:
        rc, _, err = _run(capsys, argv + extra)
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert out.read_bytes() == before
    rc, _, err = _run(capsys, ["predict", str(new), "-r", str(inp), "-o", str(tmp_path / "x.h5ad")])
    assert rc == 2 and "not fitted by cicl" in err and not (tmp_path / "x.h5ad").exists()
    rc, _, err = _run(capsys, ["predict", str(new), "-r", str(ref), "-o", str(ref), "--force"])
    assert rc == 2 and "is the input file" in err and "ref.h5ad" in err
    rc, _, err = _run(
        capsys, ["predict", str(new), "-r", str(tmp_path / "no.h5ad"), "-o", str(out), "--force"]
    )
    assert rc == 2 and "does not exist" in err


def test_cli_predict_streamed(tmp_path, tiny_cfg, capsys):
    """--stream: the input is read block by block (never loaded) and the output is a copy of
    it with the results; the same results as in memory."""
    syn = synthetic_adata(n_cells=160, n_genes=120, n_clusters=3, seed=3)
    inp, cfg, ref = tmp_path / "in.h5ad", tmp_path / "cfg.yaml", tmp_path / "ref.h5ad"
    syn.write_h5ad(inp)
    tiny_cfg.to_yaml(cfg)
    assert _run(capsys, ["fit", str(inp), "--out", str(ref), "-k", "3", "-c", str(cfg)])[0] == 0
    base = ["predict", str(inp), "--reference", str(ref), "--json"]
    mem, streamed = tmp_path / "mem.h5ad", tmp_path / "stream.h5ad"
    assert _run(capsys, base + ["--out", str(mem)])[0] == 0
    rc, stdout, err = _run(capsys, base + ["--out", str(streamed), "--stream"])
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["streamed"] is True
    a, b = ad.read_h5ad(mem), ad.read_h5ad(streamed)
    for col in ("cicl", "cicl_confidence", "cicl_dist_pct"):
        assert np.array_equal(a.obs[col].to_numpy(), b.obs[col].to_numpy()), col
    assert np.allclose(a.obsm["X_cicl"], b.obsm["X_cicl"])
    assert b.uns["cicl"]["n_cells_atypical"] == a.uns["cicl"]["n_cells_atypical"]
    assert (b.X != syn.X).nnz == 0  # the input's matrix, copied untouched
    # a stale percentile column in the input goes when the reference has no distance table
    old_ref = ad.read_h5ad(ref)
    for f in ("dist_quantiles", "dist_dims", "cluster_sizes"):
        del old_ref.uns["cicl"]["model"][f]
    old_ref.write_h5ad(tmp_path / "old_ref.h5ad")
    again = tmp_path / "again.h5ad"
    argv = ["predict", str(streamed), "-r", str(tmp_path / "old_ref.h5ad"), "-o", str(again)]
    assert _run(capsys, argv + ["--stream"])[0] == 0
    c = ad.read_h5ad(again)
    assert "cicl_dist_pct" not in c.obs and "cicl_confidence" in c.obs
    # bad values found while streaming: one line, exit 2, nothing written
    bad = syn.copy()
    bad.X = bad.X.toarray()
    bad.X[150, 5] = np.nan
    bad.write_h5ad(tmp_path / "bad.h5ad")
    out = tmp_path / "bad_out.h5ad"
    argv = ["predict", str(tmp_path / "bad.h5ad"), "-r", str(ref), "-o", str(out), "--stream"]
    rc, _, err = _run(capsys, argv)
    assert rc == 2 and "NaN or infinite" in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".bad_out*"))
    rc, _, err = _run(capsys, argv + ["--layer", "counts"])  # the file has no such layer
    assert rc == 2 and "Layer 'counts' not found" in err and err.count("\n") == 1, err


def test_cli_predict_streamed_reads_the_counts_kept_beside_log_normalised_x(
    tmp_path, tiny_cfg, capsys
):
    """--stream chooses the matrix as the in-memory path does: a log-normalised query with its
    counts in layers["counts"], or in raw/X with more genes than X (CELLxGENE's layout), is
    read from the counts block by block and mapped exactly as the counts file is; --layer X
    keeps the log values."""
    import scanpy as sc

    syn = synthetic_adata(n_cells=160, n_genes=120, n_clusters=3, seed=3)
    inp, cfg, ref = tmp_path / "in.h5ad", tmp_path / "cfg.yaml", tmp_path / "ref.h5ad"
    syn.write_h5ad(inp)
    tiny_cfg.to_yaml(cfg)
    assert _run(capsys, ["fit", str(inp), "--out", str(ref), "-k", "3", "-c", str(cfg)])[0] == 0
    logged = syn.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    layered, rawed = logged.copy(), logged[:, :100].copy()  # raw keeps all 120 genes
    layered.layers["counts"] = syn.X.copy()
    rawed.raw = syn
    want = tmp_path / "want.h5ad"
    base = ["predict", "--reference", str(ref), "--json"]
    assert _run(capsys, [base[0], str(inp)] + base[1:] + ["--out", str(want)])[0] == 0
    a = ad.read_h5ad(want)
    for name, obj, matrix in (
        ("layered", layered, "layers['counts']"),
        ("rawed", rawed, "raw.X"),
    ):
        src, out = tmp_path / f"{name}.h5ad", tmp_path / f"{name}_out.h5ad"
        obj.write_h5ad(src)
        rc, stdout, err = _run(
            capsys, [base[0], str(src)] + base[1:] + ["-o", str(out), "--stream"]
        )
        assert rc == 0, err
        res = json.loads(stdout.strip().splitlines()[-1])
        assert res["matrix"] == matrix and res["n_genes"] == 120  # rawed: raw/X's, not X's 100
        b = ad.read_h5ad(out)
        assert b.uns["cicl"]["matrix"] == matrix and b.uns["cicl"]["n_genes_missing"] == 0
        assert np.array_equal(a.obs["cicl"].to_numpy(), b.obs["cicl"].to_numpy()), name
        assert np.allclose(a.obsm["X_cicl"], b.obsm["X_cicl"], atol=1e-5), name
        assert (b.X != obj.X).nnz == 0  # the input's matrix, copied untouched
    out = tmp_path / "x_out.h5ad"
    argv = [base[0], str(tmp_path / "layered.h5ad")] + base[1:] + ["-o", str(out), "--stream"]
    rc, stdout, _ = _run(capsys, argv + ["--layer", "X"])
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1])["matrix"] == "X"
    # Python: cells read from a file beside an AnnData of their obs and var only; an AnnData
    # that does not match the file is refused before anything is written
    from cicl.errors import InputError

    light = ad.AnnData(obs=layered.obs[[]].copy(), var=layered.var[[]].copy())
    cicl.predict(light, ref, file=tmp_path / "layered.h5ad")
    assert np.array_equal(light.obs["cicl"].to_numpy(), a.obs["cicl"].to_numpy())
    assert light.uns["cicl"]["matrix"] == "layers['counts']"
    short = light[:100].copy()
    del short.obs["cicl"]
    with pytest.raises(InputError, match="holds 160 cells but adata has 100"):
        cicl.predict(short, ref, file=tmp_path / "layered.h5ad")
    assert "cicl" not in short.obs


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"cluster.space": "sphere"},
        {"cluster.space": "euclidean", "model.encoder": "mlp", "model.pca_residual": True},
        {"model.encoder": "reference", "model.ref_layers": 1, "model.ref_hidden": 16},
    ],
)
def test_rebuilt_encoder_gives_the_training_space(tiny_cfg, over):
    """Maths layer: the stored encoder state and PCA block reproduce the fitted embedding."""
    from cicl.train.loop import embed_new, load_encoder, train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 40)).astype(np.float32)
    pcs = (x @ rng.normal(size=(40, 10))).astype(np.float32)
    cfg = tiny_cfg.with_overrides({**over, "train.epochs": 2})
    res = train(x, pcs, 3, cfg)
    enc = load_encoder(cfg, res.encoder_state, x.shape[1])
    h = embed_new(enc, x, pcs, cfg, res.pca_center, res.pca_scale)
    assert h.shape == res.embedding.shape
    assert np.allclose(h, res.embedding, atol=1e-5)
