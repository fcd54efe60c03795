"""The quality benchmark's table writer: the full run's summary lines, and an ablation run on
its own (``--set ... --name``, no baselines or ``cicl`` rows) must still write its table; a
``--merge`` rerun replaces only the (method, dataset) pairs it ran."""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def _rows(methods: list[str]) -> pd.DataFrame:
    rows = []
    for i, m in enumerate(methods):
        for ds, n in (("big", 500), ("small", 50)):
            for seed in range(2):
                ari = 0.5 + 0.2 * i + 0.01 * seed
                rows.append(
                    dict(
                        dataset=ds,
                        n_cells=n,
                        k=3,
                        method=m,
                        seed=seed,
                        ari=ari,
                        nmi=ari,
                        n_found=3,
                        seconds=1.0 + i,
                    )
                )
    return pd.DataFrame(rows)


def test_full_table_compares_cicl_with_the_best_baseline():
    md = quality.to_markdown(_rows(["cicl", "kmeans_pca"]), ["cicl", "kmeans_pca"])
    assert "| big (500) | 0.505 ± 0.007 | 0.705 ± 0.007 |" in md
    assert "Best baseline per dataset, mean ARI: 0.705" in md
    assert "worst -0.200 (big), datasets more than 0.10 below: big, small." in md
    assert "`cicl` training seconds (1 thread, per seed): big 1, small 1." in md


def test_an_ablation_alone_writes_its_table_and_its_own_times():
    md = quality.to_markdown(_rows(["cicl_x"]), ["cicl_x"])
    assert "| mean | **0.505** | |" in md
    assert "Best baseline" not in md
    assert "`cicl_x` training seconds (1 thread, per seed): big 1, small 1." in md


def test_merge_replaces_only_the_method_dataset_pairs_rerun():
    old = _rows(["cicl", "kmeans_pca"])
    new = _rows(["cicl"])
    new = new[new.dataset == "small"].assign(ari=0.9)
    merged = quality.merge_rows(old, new)
    assert len(merged) == len(old)
    cicl = merged[merged.method == "cicl"].groupby("dataset").ari.mean()
    assert cicl["small"] == 0.9  # rerun
    assert abs(cicl["big"] - 0.505) < 1e-9  # kept: a --datasets rerun must not drop it
    assert (merged[merged.method == "kmeans_pca"].ari > 0.69).all()
