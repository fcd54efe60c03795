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

from cicl.config import CICLConfig, ConfigError
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
    """``spec`` is a path to a YAML file or the name of a built-in space (``tune/``).

    Everything in the file is checked here, before any work (a sweep would otherwise meet a
    bad bound or type minutes in, in the trial that draws it, as a traceback): its sections,
    each distribution's type, fields and bounds, the keys, the fixed values, and every
    choice and bound as a trial's config. Errors are one ``CICLError`` naming the file, the
    key and what to do. The distributions come back normalised (numbers as numbers)."""
    p = Path(spec)
    if not p.suffix:
        p = spaces_dir() / f"{spec}.yaml"
    if not p.is_file():
        known = ", ".join(builtin_spaces())
        raise CICLError(f"Search space '{spec}' not found. Give a YAML path or one of: {known}.")
    data = _read(p)
    where = f"Search space {p}"
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise CICLError(
            f"{where}: unknown section '{unknown[0]}'. A space has 'params:' (the searched "
            f"keys) and optionally 'fixed:'.{_did_you_mean(str(unknown[0]), SECTIONS)}"
        )
    params, fixed = data.get("params"), data.get("fixed")
    if not params:
        raise CICLError(f"{where} has no 'params'. {EXAMPLE}")
    fixed = {} if fixed is None else fixed
    for section, value in (("params", params), ("fixed", fixed)):
        if not isinstance(value, dict):
            what, example = (
                ("distributions", EXAMPLE) if section == "params" else ("values", FIXED_EXAMPLE)
            )
            raise CICLError(
                f"{where}: '{section}:' must map dotted config keys to {what}, got {value!r}. "
                + example
            )
    valid = list(CICLConfig().flat())
    for section, keys in (("params", params), ("fixed", fixed)):
        for key in keys:
            if key == "augment.type" and section == "fixed":
                raise CICLError(
                    f"{where}: fixed: augment.type can only be searched (params:); to turn an "
                    "augmentation kind off for every trial, fix its strength to 0 "
                    f"({', '.join(f'augment.{k}' for k in AUG_KINDS)})."
                )
            if key not in valid and key != "augment.type":
                raise CICLError(
                    f"{where}: {section}: unknown config key '{key}'."
                    f"{_did_you_mean(str(key), valid)} `cicl config show` lists the keys."
                )
    both = sorted(set(params) & set(fixed))
    if both:
        raise CICLError(
            f"{where}: '{both[0]}' is both searched (params:) and fixed (fixed:); keep one."
        )
    try:
        base = CICLConfig().with_overrides(fixed)
    except ConfigError as exc:
        raise CICLError(f"{where}: fixed: {exc}") from None
    out = {key: _check_dist(f"{where}: params.{key}", key, dist) for key, dist in params.items()}
    for key, dist in out.items():
        for value in _probe_values(key, dist):
            try:
                base.with_overrides({key: value})
            except ConfigError as exc:
                raise CICLError(
                    f"{where}: params.{key}: a trial drawing {value!r} would fail: {exc}"
                ) from None
    return Space(p.stem, out, fixed)


SECTIONS = ("params", "fixed")
EXAMPLE = (
    "E.g. params: {loss.temperature: {type: loguniform, low: 0.1, high: 1.0}} (tune/README.md)."
)
# each distribution type and the fields it takes (``delta`` has a default)
DIST_FIELDS: dict[str, tuple[str, ...]] = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "int": ("low", "high"),
    "choice": ("values",),
    "k_around_estimate": ("delta",),
}
FIXED_EXAMPLE = "E.g. fixed: {train.epochs: 6} (tune/README.md)."
K_DELTA = 4  # k_around_estimate's default half-width


def _read(p: Path) -> dict:
    """The space file as a mapping; YAML that does not parse is one error line."""
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CICLError(f"Search space {p} is not valid YAML{at}: {problem}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CICLError(f"Cannot read search space {p}: {exc}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CICLError(f"Search space {p} must be a mapping with 'params:'. {EXAMPLE}")
    return data


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _field_type(key: str) -> str:
    """The base type of a config field (``int``, ``float``, ``str``, ...) from its annotation."""
    from dataclasses import fields

    section, _, name = key.rpartition(".")
    obj = getattr(CICLConfig(), section) if section else CICLConfig()
    ann = next(str(f.type) for f in fields(obj) if f.name == name)
    return ann.split("|")[0].strip()


def _number(where: str, name: str, value: Any) -> float:
    """A bound as a finite float; YAML 1.1 reads ``1e-3`` as a string, a number all the same."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise CICLError(f"{where}: '{name}' must be a finite number, got {value!r}.")
    return float(value)


def _check_dist(where: str, key: str, dist: Any) -> dict:
    """One distribution checked and normalised; ``where`` starts each error."""
    if not isinstance(dist, dict):
        raise CICLError(
            f"{where} must be a distribution such as {{type: uniform, low: 0.1, high: 1.0}}, "
            f"got {dist!r} (a single value for every trial belongs under fixed:)."
        )
    t = dist.get("type")
    if t not in DIST_FIELDS:
        what = "has no 'type'" if t is None else f"has unknown type '{t}'"
        raise CICLError(
            f"{where} {what}.{_did_you_mean(str(t), DIST_FIELDS) if t is not None else ''} "
            f"Use one of: {', '.join(DIST_FIELDS)}."
        )
    takes = DIST_FIELDS[t]
    for name in dist:
        if name != "type" and name not in takes:
            raise CICLError(
                f"{where}: type {t} takes {', '.join(takes)}, not '{name}'."
                f"{_did_you_mean(str(name), takes)}"
            )
    if key == "augment.type" and t != "choice":
        raise CICLError(f"{where}: augment.type is searched with type choice, not {t}.")
    if t == "k_around_estimate":
        if key != "cluster.n_clusters":
            raise CICLError(
                f"{where}: type k_around_estimate is for cluster.n_clusters only; "
                "use type int for a range of whole numbers."
            )
        delta = _number(where, "delta", dist.get("delta", K_DELTA))
        if delta < 0 or not delta.is_integer():
            raise CICLError(f"{where}: 'delta' must be a whole number >= 0, got {delta:g}.")
        return {"type": t, "delta": int(delta)}
    if t == "choice":
        values = dist.get("values")
        if not isinstance(values, list) or not values:
            raise CICLError(
                f"{where}: type choice needs a non-empty list, e.g. values: [0.1, 0.5], "
                f"got {values!r}."
            )
        for v in values:
            if isinstance(v, (dict, list)):
                raise CICLError(f"{where}: choice values must be single values, got {v!r}.")
        if key == "augment.type":
            bad = [v for v in values if v not in AUG_TYPES]
            if bad:
                raise CICLError(
                    f"{where}: unknown augmentation type {bad[0]!r}; use one of: "
                    f"{', '.join(AUG_TYPES)}."
                )
        return {"type": t, "values": values}
    missing = [n for n in takes if n not in dist]
    if missing:
        raise CICLError(f"{where}: type {t} needs 'low' and 'high' (missing '{missing[0]}').")
    lo, hi = (_number(where, n, dist[n]) for n in takes)
    if lo > hi:
        raise CICLError(f"{where}: low ({lo:g}) is above high ({hi:g}); swap them.")
    if t == "loguniform" and lo <= 0:
        raise CICLError(
            f"{where}: type loguniform needs low > 0 (a log scale), got low {lo:g}; "
            "use type uniform for a range from 0."
        )
    if t == "int":
        if not (lo.is_integer() and hi.is_integer()):
            raise CICLError(f"{where}: type int needs whole-number bounds, got {lo:g}, {hi:g}.")
        return {"type": t, "low": int(lo), "high": int(hi)}
    if key != "augment.type" and _field_type(key) == "int":
        raise CICLError(f"{where}: {key} is a whole number: use type int or choice, not {t}.")
    return {"type": t, "low": lo, "high": hi}


def _probe_values(key: str, dist: dict) -> list:
    """The values of ``dist`` a trial's config is tried with: every choice, both bounds (the
    config's ranges are intervals, so a range whose ends pass passes whole)."""
    if key == "augment.type" or dist["type"] == "k_around_estimate":
        return []  # augmentation types are checked by name; K by the data's estimate
    if dist["type"] == "choice":
        return list(dist["values"])
    return [dist["low"], dist["high"]]


def k_range(dist: dict, k_est: int, n_cells: int) -> tuple[int, int]:
    d = int(dist.get("delta", K_DELTA))
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
    auto = max(
        auto_epochs(n, min(bs, n), cfg.train.auto_epochs, cfg.train.min_steps, cfg.train.max_steps)
        for bs in [cfg.train.batch_size, *sizes]
    )
    epochs = cfg.train.epochs or auto
    e = space.params.get("train.epochs")
    if e:  # a choice of None (null): that trial's epochs by the auto schedule
        epochs = max(v or auto for v in e["values"]) if e["type"] == "choice" else e["high"]
    every = [cfg.cluster.recluster_every or 5]
    d = space.params.get("cluster.recluster_every")
    if d and d["type"] == "choice":
        every = [v for v in d["values"] if v]
    elif d:
        every = [int(d["low"])]
    return max(1, int(np.ceil(epochs / max(1, min(every)))))
