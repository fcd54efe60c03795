"""Search spaces: the YAML files (built-in ones shipped as package data), the Ray Tune and
Optuna distributions they define, the sweep's first point (the base configuration), each
trial's configuration, and how many reclustering rounds the longest trial runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cicl.config import CICLConfig
from cicl.errors import CICLError

SPACES_PACKAGE = "cicl.spaces"  # the repository's tune/ folder, shipped under this name


def spaces_dir() -> Path:
    """The folder of the built-in spaces: the package data ``cicl.spaces`` (pyproject.toml
    maps the repository's ``tune/`` to it, in a wheel and in an editable install); the
    checkout's ``tune/`` when cicl is imported from a source tree that was never installed."""
    try:
        return Path(resources.files(SPACES_PACKAGE))  # a folder: wheels install unzipped
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "tune"


def builtin_spaces() -> list[str]:
    """The names ``--space`` takes besides a path: one per YAML file shipped with cicl."""
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


TUNE_DIR = spaces_dir()  # where the built-in spaces are read from
AUG_KINDS = ("noise_std", "mask_frac", "neighbor_prob")  # the strength that turns each kind on
AUG_TYPES = {
    "noise": ("noise_std",),
    "mask": ("mask_frac",),
    "neighbor": ("neighbor_prob",),
    "noise+mask": ("noise_std", "mask_frac"),
    "all": AUG_KINDS,
}


@dataclass(frozen=True)
class Space:
    """A search space: ``params`` (dotted config key -> distribution spec) and ``fixed``
    overrides applied to every trial."""

    name: str
    params: dict[str, dict]
    fixed: dict[str, Any] = field(default_factory=dict)


def load_space(spec: str | Path) -> Space:
    """``spec`` is a path to a YAML file or the name of a built-in space (``tune/``)."""
    p = Path(spec)
    if not p.suffix:
        p = spaces_dir() / f"{spec}.yaml"
    if not p.is_file():
        known = ", ".join(builtin_spaces())
        raise CICLError(f"Search space '{spec}' not found. Give a YAML path or one of: {known}.")
    data = yaml.safe_load(p.read_text()) or {}
    params = data.get("params") or {}
    if not params:
        raise CICLError(f"Search space '{p}' has no 'params'.")
    probe = CICLConfig()
    for key, dist in params.items():
        if key != "augment.type":
            probe.with_overrides({key: _probe_value(dist)})  # unknown keys: "did you mean"
        if dist.get("type") not in ("loguniform", "uniform", "int", "choice", "k_around_estimate"):
            raise CICLError(f"{p}: '{key}' has unknown type '{dist.get('type')}'.")
    CICLConfig().with_overrides(data.get("fixed") or {})
    return Space(p.stem, params, data.get("fixed") or {})


def _probe_value(dist: dict) -> Any:
    t = dist.get("type")
    if t == "choice":
        return dist["values"][0]
    if t == "k_around_estimate":
        return 5
    return dist["low"]


def k_range(dist: dict, k_est: int, n_cells: int) -> tuple[int, int]:
    d = int(dist.get("delta", 4))
    return max(2, k_est - d), min(n_cells - 1, k_est + d)


def tune_space(space: Space, k_est: int, n_cells: int) -> dict[str, Any]:
    """Ray Tune param space (Optuna converts these distributions)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.params.items():
        t = d["type"]
        if t == "loguniform":
            out[key] = tune.loguniform(float(d["low"]), float(d["high"]))
        elif t == "uniform":
            out[key] = tune.uniform(float(d["low"]), float(d["high"]))
        elif t == "int":
            out[key] = tune.randint(int(d["low"]), int(d["high"]) + 1)
        elif t == "choice":
            out[key] = tune.choice(list(d["values"]))
        else:
            lo, hi = k_range(d, k_est, n_cells)
            out[key] = tune.randint(lo, hi + 1)
    return out


def base_point(space: Space, base: CICLConfig, k_est: int, n_cells: int) -> dict[str, Any]:
    """The sweep's first trial: the base configuration itself (the default, unless the user
    gave a config), each value put inside the space's range. Without it a space whose ranges
    merely contain the default almost never samples it: on young_kidney none of 12 trials
    came near the default's ARI (the contrastive weights drawn from U(0, 1) are never 0)."""
    from cicl.train.loop import cluster_pca_weight

    cfg = base.with_overrides(space.fixed)
    flat = cfg.flat()
    point: dict[str, Any] = {}
    for key, d in space.params.items():
        t = d["type"]
        if key == "augment.type":
            on = tuple(k for k in AUG_KINDS if flat[f"augment.{k}"] > 0)
            names = [n for n, kinds in AUG_TYPES.items() if kinds == on]
            point[key] = names[0] if names and names[0] in d["values"] else d["values"][0]
            continue
        value = flat[key]
        if value is None and key == "cluster.n_clusters":
            value = k_est
        elif value is None and key == "cluster.pca_weight":
            value = cluster_pca_weight(cfg, n_cells)
        if t == "choice":
            point[key] = value if value in d["values"] else d["values"][0]
        elif t == "k_around_estimate":
            point[key] = k_est
        else:
            lo, hi = d["low"], d["high"]
            v = lo if value is None else min(max(value, lo), hi)
            point[key] = int(v) if t == "int" else float(v)
    return point


def trial_config(base: CICLConfig, space: Space, params: dict[str, Any]) -> CICLConfig:
    """The config of one trial: base + fixed + sampled params (``augment.type`` switches
    augmentation kinds off by zeroing their strength)."""
    over = dict(space.fixed)
    for key, v in params.items():
        if key == "augment.type":
            on = AUG_TYPES[v]
            for kind in AUG_KINDS:
                if kind not in on:
                    over[f"augment.{kind}"] = 0.0
        else:
            over[key] = v.item() if hasattr(v, "item") else v
    return base.with_overrides(over)


def max_rounds(cfg: CICLConfig, space: Space, n: int) -> int:
    """Reclustering rounds of the longest trial (ASHA's max_t): from the trials' config (the
    space's fixed values win over the base), or a trial would be stopped before its end."""
    from cicl.train.loop import auto_epochs

    cfg = cfg.with_overrides(space.fixed)
    b = space.params.get("train.batch_size")  # larger batches: fewer steps per epoch, more epochs
    sizes = b["values"] if b and b["type"] == "choice" else [int(b["high"])] if b else []
    epochs = cfg.train.epochs or max(
        auto_epochs(n, min(bs, n), cfg.train.auto_epochs, cfg.train.min_steps, cfg.train.max_steps)
        for bs in [cfg.train.batch_size, *sizes]
    )
    e = space.params.get("train.epochs")
    if e:
        epochs = max(e["values"]) if e["type"] == "choice" else int(e["high"])
    every = [cfg.cluster.recluster_every or 5]
    d = space.params.get("cluster.recluster_every")
    if d and d["type"] == "choice":
        every = [v for v in d["values"] if v]
    elif d:
        every = [int(d["low"])]
    return max(1, int(np.ceil(epochs / max(1, min(every)))))
