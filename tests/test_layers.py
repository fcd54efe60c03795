"""Three layers, one direction: the maths layer imports no AnnData, scanpy, Ray or MLflow; the
AnnData layer no Ray, MLflow or wiring module."""

import subprocess
import sys


def _loaded_after_import(modules: list[str], banned: list[str]) -> list[str]:
    """Which ``banned`` modules a fresh interpreter has loaded after importing ``modules``."""
    code = (
        f"import sys; import {', '.join(modules)}; "
        f"print(','.join(m for m in {banned!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_math_layer_imports_nothing_heavy():
    maths = ["cicl.model.losses", "cicl.model.modules", "cicl.model.augment"]
    maths += ["cicl.cluster.kmeans", "cicl.cluster.ward", "cicl.train.loop", "cicl.train.stream"]
    maths += ["cicl.train.plan", "cicl.train.final"]
    maths += ["cicl.comm", "cicl.objective"]
    assert _loaded_after_import(maths, ["anndata", "scanpy", "ray", "mlflow"]) == []


def test_anndata_layer_imports_no_wiring():
    io = ["cicl.api", "cicl.reference", "cicl.data.io", "cicl.data.preprocess"]
    io += ["cicl.data.stream", "cicl.data.estimate", "cicl.data.sample", "cicl.pipeline"]
    wiring = ["ray", "mlflow", "cicl.distributed", "cicl.sweep", "cicl.tracking", "cicl.cli"]
    assert _loaded_after_import(io, wiring) == []
