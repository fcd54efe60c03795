"""cicl: Cluster-aware Iterative Contrastive Learning for single-cell RNA-seq clustering."""

from cicl.api import fit, score
from cicl.config import CICLConfig, load_config, preset
from cicl.data.synthetic import synthetic_adata
from cicl.errors import CICLError, ConfigError, InputError

__all__ = [
    "CICLConfig", "CICLError", "ConfigError", "InputError", "fit", "load_config", "preset",
    "score", "synthetic_adata",
]
__version__ = "0.1.0"
