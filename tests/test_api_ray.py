"""``cicl.fit(adata, k, workers=N)``, the README's Ray path from Python, on a real local Ray."""

from __future__ import annotations

import numpy as np

import cicl


def test_fit_with_workers_trains_on_ray_workers(tiny_cfg, tmp_path, monkeypatch):
    """Raised NameError (RayOptions imported only for type checking) before it was fixed."""
    import ray

    from cicl._cpu import kernel_env
    from cicl.data.synthetic import synthetic_adata

    monkeypatch.chdir(tmp_path)  # the run folder (runs/ray) goes here, not into the repo
    syn = synthetic_adata(n_cells=300, n_genes=200, n_clusters=3, seed=1)
    ray.shutdown()
    try:
        out = cicl.fit(syn, 3, config=tiny_cfg, workers=2, copy=True, progress=False)
        # the workers run the kernels the driver runs (cicl._cpu; Ray imports torch first)
        capability = ray.remote(
            lambda: __import__("torch").backends.cpu.get_cpu_capability()
        ).remote()
        worker_kernels = ray.get(capability)
    finally:
        ray.shutdown()
    assert out.uns["cicl"]["workers"] == 2
    assert set(np.unique(out.obs["cicl"].astype(int))) == {0, 1, 2}
    assert any((tmp_path / "runs" / "ray").iterdir())
    if kernel_env():
        assert worker_kernels == "AVX2"
