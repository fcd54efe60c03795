import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cicl.config import PreprocessConfig
from cicl.data.preprocess import detect_values, preprocess
from cicl.data.synthetic import synthetic_adata


@pytest.mark.parametrize(
    "values, kind",
    [
        (np.array([[0, 3, 1], [2, 0, 7]]), "counts"),
        (np.array([[0.0, 1.3, 2.2], [0.5, 0, 4.1]]), "log"),
        (np.array([[0.0, 130.5, 2.2], [1000.1, 0, 4.1]]), "unlogged"),
        (np.array([[-0.5, 1.3], [0.5, -1.2]]), "scaled"),
    ],
)
def test_detect_values(values, kind):
    assert detect_values(sp.csr_matrix(values)) == kind
    assert detect_values(values) == kind


def test_counts_are_normalised_logged_and_recorded():
    a = synthetic_adata(n_cells=120, n_genes=300)
    before = a.X.copy()
    p = preprocess(a, PreprocessConfig(n_top_genes=100, n_pcs=10))
    assert (a.X != before).nnz == 0  # input untouched
    assert p.x.shape == (120, 100) and p.pcs.shape == (120, 10)
    assert p.info["values"] == "counts"
    assert "log1p" in p.info["steps"] and any("highly_variable" in s for s in p.info["steps"])
    assert abs(float(p.x.mean())) < 1e-3


def test_logged_data_is_not_logged_again():
    a = synthetic_adata(n_cells=80, n_genes=50)
    a.X = sp.csr_matrix(np.log1p(a.X.toarray() * 1.37))
    p = preprocess(a, PreprocessConfig(n_pcs=5))
    assert p.info["values"] == "log"
    assert not any(s.startswith("log1p") for s in p.info["steps"])
    assert p.info["n_genes_used"] == 50  # fewer genes than n_top_genes: all kept


def test_dense_and_sparse_inputs_agree():
    a = synthetic_adata(n_cells=60, n_genes=40)
    b = ad.AnnData(X=a.X.toarray().astype(np.float64), obs=a.obs, var=a.var)
    pa = preprocess(a, PreprocessConfig(n_pcs=5))
    pb = preprocess(b, PreprocessConfig(n_pcs=5))
    assert np.allclose(pa.x, pb.x, atol=1e-4)


def _log_normalised(a: ad.AnnData) -> ad.AnnData:
    """The usual scanpy layout after normalisation: log-normalised X, counts kept aside."""
    import scanpy as sc

    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def test_auto_matrix_reads_the_counts_a_log_normalised_object_keeps():
    from cicl.data.preprocess import choose_matrix, record_matrix
    from cicl.errors import InputError

    a = synthetic_adata(n_cells=60, n_genes=40)
    assert choose_matrix(a).name == "X"  # X holds counts: X
    b = _log_normalised(a)
    assert choose_matrix(b).name == "X"  # no counts anywhere: X
    for name in ("counts", "raw_counts", "UMI_counts"):
        c = b.copy()
        c.layers[name] = a.X.copy()
        m = choose_matrix(c)
        assert (m.layer, m.name) == (name, f"layers['{name}']") and m.source is c
        assert "X holds log values" in m.note
        assert choose_matrix(c, "X").name == "X"  # the user can keep X
    c = b.copy()
    c.layers["counts"] = b.X.copy()  # named counts, holds log values: not taken
    assert choose_matrix(c).name == "X"
    c = b.copy()
    c.raw = a  # CELLxGENE's layout: counts in .raw
    m = choose_matrix(c)
    assert m.name == "raw.X" and m.layer is None and m.source.shape == a.shape
    p = preprocess(m.source, PreprocessConfig(n_pcs=5), layer=m.layer)
    record_matrix(p.info, m)
    assert p.info["values"] == "counts" and p.info["matrix"] == "raw.X"
    assert p.info["steps"][0].startswith("X holds log values, the raw counts are in raw.X")
    ref = preprocess(a, PreprocessConfig(n_pcs=5))
    assert np.allclose(p.x, ref.x) and np.array_equal(p.counts, ref.counts)
    assert choose_matrix(c, "raw").name == "raw.X"
    with pytest.raises(InputError, match="Layer 'spliced' not found; available: X, raw"):
        choose_matrix(c, "spliced")
    c = ad.AnnData(obs=a.obs, var=a.var)  # no X at all, counts in a layer
    c.layers["counts"] = a.X.copy()
    assert choose_matrix(c).note == "X is empty, the raw counts are in layers['counts']"
