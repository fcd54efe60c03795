"""cicl: Cluster-aware Iterative Contrastive Learning for single-cell RNA-seq clustering.

Public names are imported lazily, so ``import cicl.model.losses`` (the maths layer) never
pulls in AnnData, scanpy, Ray or MLflow.
"""

from importlib import import_module

from cicl._cpu import pin_cpu_kernels

pin_cpu_kernels()  # before anything imports torch: see cicl._cpu

_EXPORTS = {
    "fit": "cicl.api",
    "score": "cicl.objective:truth_scores",
    "predict": "cicl.reference",
    "log_fit": "cicl.tracking",
    "CICLConfig": "cicl.config",
    "load_config": "cicl.config",
    "preset": "cicl.config",
    "synthetic_adata": "cicl.data.synthetic",
    "CICLError": "cicl.errors",
    "ConfigError": "cicl.errors",
    "InputError": "cicl.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(import_module(module), attr or name)
    raise AttributeError(f"module 'cicl' has no attribute {name!r}")
