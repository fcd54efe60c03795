"""The maths layer imports no AnnData, scanpy, Ray or MLflow (three layers, one direction)."""

import subprocess
import sys


def test_math_layer_imports_nothing_heavy():
    code = (
        "import sys; import cicl.model.losses, cicl.model.modules, cicl.model.augment, "
        "cicl.cluster.kmeans, cicl.cluster.ward, cicl.train.loop, cicl.train.stream, "
        "cicl.comm, cicl.objective; "
        "bad = [m for m in ('anndata', 'scanpy', 'ray', 'mlflow') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_anndata_layer_imports_no_wiring():
    code = (
        "import sys; import cicl.api, cicl.reference, cicl.data.io, cicl.data.preprocess, "
        "cicl.data.stream, cicl.data.estimate; "
        "bad = [m for m in ('ray', 'mlflow', 'cicl.distributed', 'cicl.sweep', "
        "'cicl.tracking', 'cicl.cli') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
