"""Configuration: frozen dataclasses, one schema for the CLI, YAML files and (later) Tune.

Every paper-vs-code divergence listed in ``shared/notes/method.md`` is a switch here, so the
``reference`` preset reproduces the official code while ``default`` is what measured best.
Dotted keys (``"loss.temperature"``) address fields for overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key the user must fix."""


@dataclass(frozen=True)
class PreprocessConfig:
    # HVG count; None = 2000, or all genes when there are fewer. An explicit count larger
    # than the number of genes is refused.
    n_top_genes: int | None = None
    # what X holds: "auto" detects it; "counts" etc. insist (and refuse X that is not)
    values: Literal["auto", "counts", "unlogged", "log", "scaled"] = "auto"
    scale: bool = True  # z-score genes, clipped at max_value
    max_value: float = 10.0
    n_pcs: int = 50  # PCA used for the kNN graph, gene tokens and K estimation
    min_genes: int = 0  # drop cells with fewer expressed genes (0 = keep all)
    # obs column naming each cell's batch (sample, donor, run): HVGs are chosen within
    # batches and scanpy's ComBat removes per-batch gene shifts before scaling (None = off)
    batch_key: str | None = None

    def __post_init__(self) -> None:
        _check_section(self, "preprocess")


@dataclass(frozen=True)
class TransformerConfig:
    """``model.encoder: transformer``: genes grouped into co-expression modules, one token per
    module, real attention between them."""

    n_tokens: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 128
    dropout: float = 0.1
    # embedding read-out: "cls" = the CLS token after attention; "tokens" = a linear map of
    # every module token after attention (no pooling bottleneck; attention still mixes modules)
    readout: Literal["cls", "tokens"] = "cls"

    def __post_init__(self) -> None:
        _check_section(self, "model.transformer")
        _check(
            self.d_model % self.n_heads == 0,
            "model.transformer.d_model must be divisible by model.transformer.n_heads",
        )


@dataclass(frozen=True)
class ReferenceEncoderConfig:
    """``model.encoder: reference`` (the official code's): residual MLP blocks at width G (the
    gene count), embedding dimension G."""

    layers: int = 4
    hidden: int = 1024
    dropout: float = 0.2

    def __post_init__(self) -> None:
        _check_section(self, "model.reference")


@dataclass(frozen=True)
class ModelConfig:
    # default "mlp": G -> mlp_hidden -> mlp_bottleneck -> embed_dim with BatchNorm; with the
    # count decoder it clustered the twelve shared sets best (docs/benchmarks.md).
    # "transformer" and "reference": their knobs are in their own sections below
    encoder: Literal["transformer", "mlp", "reference"] = "mlp"
    mlp_hidden: int = 256
    mlp_bottleneck: int = 64
    batch_norm: bool = True  # BatchNorm in the MLP encoder and the decoder
    embed_dim: int = 32
    pca_residual: bool = False  # h = PCA(x) + encoder(x); the encoder's branch starts small
    # projection head
    proj_hidden: int = 256
    proj_dim: int = 64
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    reference: ReferenceEncoderConfig = field(default_factory=ReferenceEncoderConfig)

    def __post_init__(self) -> None:
        _check_section(self, "model")


@dataclass(frozen=True)
class AugmentConfig:
    """Two views per cell, resampled every step (``resample="static"`` mimics the code)."""

    noise_std: float = 0.5  # Gaussian noise (the paper's augmentation)
    noise_frac: float = 0.8  # fraction of genes that receive noise
    mask_frac: float = 0.5  # gene masking: fraction of genes set to 0 (the scaled mean)
    neighbor_prob: float = 0.5  # replace a view by a kNN neighbour mixed with the cell
    neighbor_mix: float = 0.5  # weight of the neighbour in that mix
    n_neighbors: int = 10
    resample: Literal["step", "static"] = "step"

    def __post_init__(self) -> None:
        _check_section(self, "augment")


@dataclass(frozen=True)
class LossConfig:
    """Training objective: recon_weight * reconstruction + instance_weight * instance term +
    lam * cluster-aware term. The default is reconstruction alone: on the twelve shared sets
    either contrastive term, at any weight tried, lowered the clustering (docs/benchmarks.md);
    sweeps search both weights."""

    # reconstruction of the cell from its embedding (a decoder head): "nb" = negative binomial
    # likelihood of the raw counts (library size from the cell's counts of the genes used),
    # "gaussian" = squared error on the scaled input, "auto" = nb for count input, else gaussian,
    # "off" = no decoder
    recon: Literal["auto", "nb", "gaussian", "off"] = "auto"
    recon_weight: float = 1.0
    instance_weight: float = 0.0  # weight of the instance term (NT-Xent or the code's InfoNCE)
    temperature: float = 0.5
    kernel: Literal["cosine", "student_t"] = "cosine"  # similarity in the contrastive losses
    lam: float = 0.0  # weight of the cluster-aware term
    cluster_loss: Literal["paper", "code"] = "paper"
    instance_loss: Literal["ntxent", "code"] = "ntxent"
    confidence: float = 0.0  # pseudo-labels with max Student's t q below this are ignored
    warmup_frac: float = 0.3  # fraction of training before the cluster-aware term starts

    def __post_init__(self) -> None:
        _check_section(self, "loss")
        _check(
            (self.recon != "off" and self.recon_weight > 0)
            or self.instance_weight > 0
            or self.lam > 0,
            "the loss has no term: give loss.recon_weight, loss.instance_weight or loss.lam > 0",
        )


@dataclass(frozen=True)
class ClusterConfig:
    n_clusters: int | None = None  # None: estimated without labels
    recluster_every: int | None = 5  # epochs between K-means rounds; None = never (code)
    # where K-means, Student's t and final labels work: "sphere" = L2-normalised embedding
    # (where the contrastive loss acts), "euclidean" = raw embedding, "hybrid" = the
    # normalised embedding concatenated with the input's PCA (RMS norm pca_weight)
    space: Literal["sphere", "euclidean", "hybrid"] = "hybrid"
    # hybrid: RMS norm of the PCA block next to the unit-norm embedding. None = by the number
    # of cells n: 2 up to 1,000 cells, 0.5 from 5,000, log-linear between. A learned embedding
    # needs cells to be trusted: on small sets the PCA geometry clusters better, on large ones
    # the learned embedding (see cluster_pca_weight and docs/model.md)
    pca_weight: float | None = None
    alpha: float = 1.0  # Student's t degrees of freedom
    n_init: int = 10  # k-means++ restarts of a reclustering round, best inertia kept
    # restarts of the final K-means; None = by cell count: about 200,000 cell-restarts, at least
    # n_init and at most 100 (small sets: K-means on them is a lottery between local optima at
    # 10 restarts; big sets: cost; measured in docs/development-log.md)
    final_n_init: int | None = None
    # final K-means: one more start, Lloyd from the centroids of a Ward partition, kept when its
    # inertia is lower than the best k-means++ restart's (same objective, a better start on
    # imbalanced data: k-means++ keeps splitting a large class where Ward seeds small ones)
    ward_start: bool = True
    # K above what the data resolve: when the given K exceeds the number of communities
    # scanpy's default Leiden finds (resolution 1 on the PCA, clusters of >= max(3, 0.5 %) of
    # the cells; ``n_resolved``), the final K-means forms that many clusters and the remaining
    # ones are minority sub-groups split off them (``split_minorities``), instead of halves of
    # large populations. "off": K-means with K, as asked
    cap_k: Literal["leiden", "off"] = "leiden"
    # that community count; filled in by ``cicl.fit`` (and the sweeps) from ``cap_k``; a
    # number fixes it; None: no cap (what calling ``train`` directly without it does)
    n_resolved: int | None = None
    kmeans_sample: int = 50_000  # streaming: K-means fitted on this many cells, all assigned
    max_iter: int = 100
    pseudo_label_mode: Literal["eval", "train"] = "eval"  # "train" = dropout on (code)
    # the final K-means partition refined as a Gaussian mixture (classification EM, equal
    # proportions; cicl.cluster.mixture). "tied": one shared covariance (Ledoit-Wolf shrunk): a
    # population stretched along a nuisance direction (depth) is not cut across it, and with
    # few cells per dimension the shrinkage keeps K-means' metric. "full" (default): that, then
    # each cluster its own covariance: full_prior * d pseudo-cells of the shared covariance in
    # each cluster's (few cells: the shared metric; many: their own shape), never less than
    # full_floor of it, log-determinants in the rule: a broad population keeps its far cells.
    # "euclidean": K-means' partition as it is
    metric: Literal["tied", "full", "euclidean"] = "full"
    full_prior: float = 30.0
    full_floor: float = 0.5

    def __post_init__(self) -> None:
        _check_section(self, "cluster")


PRECISIONS = ("auto", "fp32", "bf16")  # train.precision


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: chosen from the cell count (see train.loop.auto_epochs)
    auto_epochs: int = 20  # auto schedule: this many passes over the data ...
    min_steps: int = 100  # ... but at least this many optimiser steps ...
    max_steps: int = 600  # ... and at most this many
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"  # "auto" picks cuda when available
    # the training step's forward: "bf16" under torch.autocast (losses in fp32), "fp32" plain;
    # "auto": bf16 on a CUDA GPU that has it, fp32 elsewhere (on CPU results stay bitwise those
    # of fp32). Embeddings, K-means and the final partition are fp32 whatever this says
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto schedule: an epoch is at most this many steps. A large dataset's passes are cut
    # into epochs, so it gets reclustering rounds (cluster.recluster_every epochs apart) while
    # it trains; a dataset whose pass is this many steps or fewer (25,600 cells at batch 256)
    # keeps one pass per epoch
    epoch_steps: int = 100
    # stop training after this many seconds of it (then the last round and the final
    # partition, as at the end of the schedule); None: the schedule decides
    time_budget: float | None = None
    # streaming (atlases read from disk): cells per pool (mixing neighbours and minibatches
    # come from it), made of random chunks of chunk_size consecutive file rows, so that a file
    # stored sorted (by type, donor, sample) is read in random order, in runs of rows
    block_size: int = 4096
    chunk_size: int = 32
    steps_per_epoch: int | None = None  # cap on steps per epoch (None: one pass over the cells)

    def __post_init__(self) -> None:
        _check_section(self, "train")
        _check(  # a literal, so ``_typed`` checks it from files and --set; this: from code
            self.precision in PRECISIONS,
            f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}.",
        )


@dataclass(frozen=True)
class CICLConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_section(self, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. for MLflow params (``model.transformer.n_tokens``)."""
        return _flatten(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CICLConfig:
        return with_overrides(cls(), _flatten(data))

    def with_overrides(self, overrides: dict[str, Any]) -> CICLConfig:
        return with_overrides(self, overrides)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


# The one table of allowed ranges, by dotted key (a None value passes where the type allows
# it: "auto" / "never"). Types are checked where values come in (``_typed``); finiteness and
# these ranges whenever a section is built (``_check_section``), however it was built.
LIMITS: dict[str, str] = {
    "preprocess.n_top_genes": ">= 2",
    "preprocess.max_value": "> 0",
    "preprocess.n_pcs": ">= 2",
    "preprocess.min_genes": ">= 0",
    "model.mlp_hidden": ">= 1",
    "model.mlp_bottleneck": ">= 1",
    "model.transformer.d_model": ">= 1",
    "model.transformer.n_layers": ">= 1",
    "model.transformer.n_heads": ">= 1",
    "model.transformer.ffn_dim": ">= 1",
    "model.embed_dim": ">= 1",
    "model.reference.layers": ">= 1",
    "model.reference.hidden": ">= 1",
    "model.proj_hidden": ">= 1",
    "model.proj_dim": ">= 1",
    "model.transformer.n_tokens": ">= 2",  # attention needs several tokens
    "model.transformer.dropout": "in [0, 1)",
    "model.reference.dropout": "in [0, 1)",
    "augment.noise_std": ">= 0",
    "augment.noise_frac": "in [0, 1]",
    "augment.mask_frac": "in [0, 1]",
    "augment.neighbor_prob": "in [0, 1]",
    "augment.neighbor_mix": "in [0, 1]",
    "augment.n_neighbors": ">= 1",
    "loss.recon_weight": ">= 0",
    "loss.instance_weight": ">= 0",
    "loss.temperature": "> 0",
    "loss.lam": ">= 0",
    "loss.confidence": "in [0, 1)",
    "loss.warmup_frac": "in [0, 1]",
    "cluster.n_clusters": ">= 2",
    "cluster.recluster_every": ">= 1",
    "cluster.pca_weight": ">= 0",
    "cluster.alpha": "> 0",
    "cluster.n_init": ">= 1",
    "cluster.final_n_init": ">= 1",
    "cluster.n_resolved": ">= 1",
    "cluster.kmeans_sample": ">= 2",
    "cluster.max_iter": ">= 1",
    "cluster.full_prior": ">= 0",
    "cluster.full_floor": "in [0, 1]",
    "train.epochs": ">= 1",
    "train.auto_epochs": ">= 1",
    "train.min_steps": ">= 1",
    "train.max_steps": ">= 1",
    "train.batch_size": ">= 4",
    "train.lr": "> 0",
    "train.weight_decay": ">= 0",
    "train.block_size": ">= 64",
    "train.steps_per_epoch": ">= 1",
    "train.epoch_steps": ">= 1",
    "train.time_budget": "> 0",
    "train.chunk_size": ">= 1",
    "seed": "in [0, 4294967295]",  # numpy's seeds
}


def _within(value: float, rule: str) -> bool:
    if rule.startswith("in "):
        lo, hi = (float(b) for b in rule[4:-1].split(","))
        return lo <= value and (value < hi if rule.endswith(")") else value <= hi)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def _finite(value: float) -> bool:
    """Finite as a float (an int beyond float's range is not: it cannot be used as one)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_section(obj: Any, section: str) -> None:
    """Every numeric field finite and inside ``LIMITS``."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        key = f"{section}.{f.name}" if section else f.name
        if not _finite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}.")
        rule = LIMITS.get(key)
        if rule is not None and not _within(value, rule):
            raise ConfigError(f"{key} must be {rule}, got {value}.")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "preset":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


TRANSFORMER_KEYS = ("n_tokens", "d_model", "n_layers", "n_heads", "ffn_dim", "dropout", "readout")


def _valid_keys() -> list[str]:
    return list(CICLConfig().flat())


# options since removed, each with the one value that meant what the code now always does: a
# config saved before (a YAML file, a fitted model's params) that names one still loads
REMOVED = {"model.cell_token": False, "model.residual_init": 0.1, "cluster.final": "kmeans"}
# options moved into a section of their own: the old names (saved configs, fitted models'
# params, habits) still work
RENAMED = {
    **{f"model.{k}": f"model.transformer.{k}" for k in TRANSFORMER_KEYS},
    **{f"model.ref_{k}": f"model.reference.{k}" for k in ("layers", "hidden", "dropout")},
}


def _drop_removed(overrides: dict[str, Any]) -> None:
    """Drop removed keys that ask for what the code does anyway; refuse those that do not."""
    for key in [k for k in overrides if k in REMOVED]:
        value, kept = overrides.pop(key), REMOVED[key]
        if value != kept:
            raise ConfigError(f"{key} was removed: only {kept!r} is left (got {value!r}).")


def with_overrides(cfg: CICLConfig, overrides: dict[str, Any]) -> CICLConfig:
    """Return a copy of ``cfg`` with dotted-key overrides applied; unknown keys are refused,
    removed ones dropped when they hold what the code does now (``REMOVED``)."""
    overrides = dict(overrides)
    _drop_removed(overrides)
    if "preset" in overrides:
        cfg = preset(str(overrides.pop("preset")))
    valid = _valid_keys()
    overrides = {RENAMED.get(k, k): v for k, v in overrides.items()}
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{key}'.{hint}")
    return _apply(cfg, "", overrides)


def _apply(obj: Any, prefix: str, overrides: dict[str, Any]) -> Any:
    """``obj`` (a config section) with the overrides under ``prefix`` applied, typed by each
    field's annotation; nested sections recursively."""
    changes: dict[str, Any] = {}
    for f in fields(obj):
        key = prefix + f.name
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            sub = {k: v for k, v in overrides.items() if k.startswith(key + ".")}
            if sub:
                changes[f.name] = _apply(getattr(obj, f.name), key + ".", sub)
        elif key in overrides:
            changes[f.name] = _typed(key, overrides[key], str(f.type))
    return dataclasses.replace(obj, **changes) if changes else obj


def _typed(key: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against a field's annotation (string form); return it normalised."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "never")):
        if "None" in annotation:
            return None
        raise ConfigError(f"{key} cannot be empty.")
    if annotation.startswith("Literal"):
        allowed = [a.strip().strip("'\"") for a in annotation[8:-1].split(",")]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}.")
        return value
    base = annotation.split("|")[0].strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}.")
        return value
    if base in ("int", "float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string: a number all the same
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number ({base}), got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number ({base}), got {value!r}.")
        if not _finite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}.")
        if base == "int":
            if float(value) != int(value):
                raise ConfigError(f"{key} must be an integer, got {value!r}.")
            return int(value)
        return float(value)
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}.")
    return value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> CICLConfig:
    """Load a YAML config (optionally with ``preset: reference``) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist.")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"Config file '{p}' is not UTF-8 text. Give a YAML file.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping of keys to values.")
        data = _flatten(loaded)
    data.update(overrides or {})
    return with_overrides(CICLConfig(), data)


PRESETS = ("default", "contrastive", "reference")


def preset(name: str) -> CICLConfig:
    """Named configurations. ``reference`` reproduces the official code's behaviour;
    ``contrastive`` is the paper's method as this package ran it by default before the count
    decoder (gene-module Transformer, NT-Xent + the paper's cluster-aware loss after warm-up,
    no reconstruction, PCA block at weight 2, final K-means with K and without the Ward start),
    kept for comparison. Neither uses the final step's later additions (Ward start, K cap,
    shared-covariance refinement)."""
    if name == "default":
        return CICLConfig()
    if name == "contrastive":
        return CICLConfig(
            model=ModelConfig(encoder="transformer"),
            loss=LossConfig(recon="off", instance_weight=1.0, lam=1.0),
            cluster=ClusterConfig(
                pca_weight=2.0, ward_start=False, cap_k="off", metric="euclidean"
            ),
        )
    if name == "reference":
        return CICLConfig(
            model=ModelConfig(
                encoder="reference", proj_hidden=2048, proj_dim=512, batch_norm=False
            ),
            augment=AugmentConfig(
                noise_std=0.5, noise_frac=0.8, mask_frac=0.0, neighbor_prob=0.0, resample="static"
            ),
            loss=LossConfig(
                recon="off",
                instance_weight=1.0,
                temperature=0.5,
                lam=0.1,
                cluster_loss="code",
                instance_loss="code",
                warmup_frac=0.0,
            ),
            cluster=ClusterConfig(
                recluster_every=None,
                pseudo_label_mode="train",
                space="euclidean",
                ward_start=False,
                cap_k="off",
                metric="euclidean",
            ),
            train=TrainConfig(epochs=51, batch_size=6000, lr=1e-4, weight_decay=1e-3),
        )
    raise ConfigError(f"Unknown preset '{name}'. Choose one of: {', '.join(PRESETS)}.")
