"""Atlas benchmark: CICL streamed from disk vs scanpy's pipeline on synthetic atlases.

Atlases are built from a real dataset with ``cicl simulate --mode mix --proportions zipf``
(pairs of real cells of each type, thinned and summed; a long tail of rare types; ``--mode``
picks another) in two row orders:
``sorted`` by type, as real atlases are stored, and ``shuffled`` (same seed: the same source
cells and type counts, rows permuted). They are cached under ``--work`` and reused.

Every method runs in its own subprocess, so its peak memory is its own:

- ``cicl``: ``cicl fit ATLAS --stream --n-clusters K`` (true K);
- ``cicl_est_k``: the same without ``--n-clusters`` (K estimated without labels);
- ``cicl_contrastive``: ``--preset contrastive`` with the true K;
- ``cicl_no_training``: the default's final steps (K cap, K-means restarts and Ward start,
  shared then per-cluster covariance refinement on the K-means sample, every cell assigned
  block by block) on the preprocessing's PCA scores instead of the trained space: what the
  training adds. The CLI cannot skip training (``train.epochs`` >= 1), so this calls cicl's
  own functions (``prepare_file``, ``final_partition``, ``assign_cells``);
- ``scanpy_kmeans``, ``scanpy_leiden``, ``scanpy_leiden_k``: one subprocess reads the whole
  atlas and runs normalize_total, log1p, highly_variable_genes (2,000, seurat), PCA (50
  components, ``--scanpy-pca`` solver), then K-means on the PCA (true K, 10 restarts), and on a
  15-NN graph (pynndescent, called directly: scanpy 1.11's own pynndescent path fails on
  scipy's csr_array and the exact sklearn search is too slow at a million cells; UMAP
  connectivities as scanpy computes them) Leiden at resolution 1 and Leiden with the
  resolution bisected to give K. Each row's time is the shared steps plus its own.

Peak memory: ``driver_rss_mb`` is the method's process (its high-water mark polled every 0.5
s, exact ``wait4`` figure when no Ray workers ran), ``worker_rss_mb`` the largest Ray worker's
(each rank's own ``ru_maxrss``, with ``--workers``), ``tree_rss_mb`` the peak of the summed RSS
of the process and all its descendants (Ray's own processes included; shared pages counted in
every process). Scores use ``cicl.objective.truth_scores``; ``rare_f1`` is its mean F1 over the
true types below 1 % of the cells (NaN where that cicl does not report it).

Rows are appended to ``atlas.csv`` in ``--results`` after every run, so a run can be split over
invocations; ``atlas.md`` and ``atlas.png`` are rewritten from the whole CSV.

    .venv/bin/python benchmarks/atlas.py --cells 100000 1000000 --seeds 0
    .venv/bin/python benchmarks/atlas.py --cells 20000 --datasets cite_cbmc \\
        --methods cicl scanpy --results /tmp/atlas-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

CICL_METHODS = ["cicl", "cicl_est_k", "cicl_contrastive", "cicl_no_training"]
SCANPY_METHODS = ["scanpy_kmeans", "scanpy_leiden", "scanpy_leiden_k"]
METHODS = CICL_METHODS + SCANPY_METHODS
PRESET_OF = {"cicl_contrastive": "contrastive"}
COLUMNS = [
    "dataset",
    "cells",
    "order",
    "method",
    "seed",
    "workers",
    "k_true",
    "ari",
    "nmi",
    "rare_f1",
    "k_found",
    "wall_s",
    "driver_rss_mb",
    "worker_rss_mb",
    "tree_rss_mb",
    "train_cells_per_s",
    "status",
    "machine",
    "date",
]
POLL_S = 0.5


# --- measuring a subprocess -------------------------------------------------------------------


@dataclass
class Measured:
    """What ``run_measured`` saw of one command: exit code, seconds, peak memory (MB)."""

    rc: int
    wall_s: float
    driver_mb: float  # the process' own peak
    tree_mb: float  # peak of the summed RSS of the process and its descendants
    ray_worker_mb: float  # largest peak among descendant Ray workers (NaN: none)
    stderr: str = ""
    polled: dict = field(default_factory=dict)


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process, empty when it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])  # the name may hold spaces
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.extend(kids.get(p, []))
        todo.extend(kids.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ray_worker(cmdline: str) -> bool:
    """A Ray worker or actor process (its title ``ray::NAME``), not one of Ray's per-node
    agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)."""
    title = cmdline.split(" ", 1)[0]
    return title.startswith("ray::") and not title.endswith("Agent")


def run_measured(cmd: list[str], timeout_s: float, log: Path) -> Measured:
    """Run ``cmd`` (stdout and stderr to ``log``), polling its process tree's memory. Ray
    workers are recognised by their ``ray::`` process title (Ray's raylet, started by the
    driver, starts them)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid, peak_self, peak_tree, worker_peak = proc.pid, 0, 0, {}
    rc, usage = None, None
    while rc is None:
        done, status, ru = os.wait4(pid, os.WNOHANG)
        if done == pid:
            rc, usage = os.waitstatus_to_exitcode(status), ru
            proc.returncode = rc  # reaped here: Popen must not wait for it again
            break
        me = _status(pid)
        peak_self = max(peak_self, me.get("VmHWM", 0), me.get("VmRSS", 0))
        tree = me.get("VmRSS", 0)
        for p in descendants(pid):
            st = _status(p)
            tree += st.get("VmRSS", 0)
            if is_ray_worker(_cmdline(p)):
                worker_peak[p] = max(worker_peak.get(p, 0), st.get("VmHWM", 0))
        peak_tree = max(peak_tree, tree)
        if time.perf_counter() - t0 > timeout_s:
            os.killpg(pid, 9)  # the session this run started, nothing else
            os.waitpid(pid, 0)
            rc = proc.returncode = 124
            break
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    # no Ray: wait4's ru_maxrss is exact (the largest of the process and any child it reaped)
    if usage is not None and not worker_peak:
        peak_self = max(peak_self, usage.ru_maxrss)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    return Measured(
        rc,
        wall,
        peak_self / 1024,
        max(peak_tree, peak_self) / 1024,
        max(worker_peak.values()) / 1024 if worker_peak else np.nan,
        tail,
    )


# --- atlases -------------------------------------------------------------------------------


def cli() -> list[str]:
    """``cicl`` as this interpreter runs it (the checkout on PYTHONPATH, if any)."""
    return [sys.executable, "-m", "cicl.cli"]


SIM_MODE = "mix"  # cicl simulate --mode (set by --mode)


def atlas_path(work: Path, dataset: str, cells: int, seed: int, order: str) -> Path:
    return work / "atlases" / f"{dataset}_{cells}_{SIM_MODE}_s{seed}_{order}.h5ad"


def ensure_atlas(data: Path, work: Path, dataset: str, cells: int, seed: int, order: str) -> Path:
    """The cached atlas, simulated first if missing (``cicl simulate`` writes atomically)."""
    path = atlas_path(work, dataset, cells, seed, order)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        *cli(),
        "simulate",
        "--like",
        str(data / f"{dataset}.h5ad"),
        "--cells",
        str(cells),
        "--mode",
        SIM_MODE,
        "--proportions",
        "zipf",
        "--order",
        order,
        "--seed",
        str(seed),
        "--out",
        str(path),
        "--quiet",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"simulated {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def truth(path: Path) -> np.ndarray:
    from cicl.data.io import read_annotations

    return read_annotations(path, ("obs",)).obs["cell_type"].astype(str).to_numpy()


# --- methods -------------------------------------------------------------------------------


def cicl_command(
    method: str, atlas: Path, k: int, seed: int, out: Path, workers: int, run_dir: Path
) -> list[str]:
    cmd = [*cli(), "fit", str(atlas), "--stream", "--out", str(out), "--seed", str(seed)]
    cmd += ["--quiet", "--force"]
    if method != "cicl_est_k":
        cmd += ["--n-clusters", str(k)]
    if method in PRESET_OF:
        cmd += ["--preset", PRESET_OF[method]]
    if workers:
        cmd += ["--workers", str(workers), "--run-dir", str(run_dir), "--run-name", out.stem]
    return cmd


def read_fit(out: Path) -> tuple[np.ndarray, dict]:
    """Labels (NaN: dropped cells) and ``uns`` of a streamed fit's output."""
    from cicl.data.io import read_annotations

    res = read_annotations(out, ("obs", "uns"))
    return res.obs["cicl"].to_numpy(), dict(res.uns["cicl"])


def train_rate(uns: dict) -> float:
    """Training cells per second: steps x the (global) batch over the training phase."""
    tm = uns.get("timings", {})
    batch = uns.get("params", {}).get("train", {}).get("batch_size", np.nan)
    return float(uns.get("steps", 0)) * float(batch) / max(float(tm.get("train", np.nan)), 1e-9)


def score(labels: np.ndarray, y: np.ndarray) -> dict:
    from cicl.objective import truth_scores

    s = truth_scores(labels, y)
    found = pd.Series(labels).dropna().nunique()
    return {
        "ari": s["ari"],
        "nmi": s["nmi"],
        "rare_f1": s.get("rare_f1", np.nan),
        "k_found": int(found),
    }


def run_cicl(method: str, atlas: Path, y: np.ndarray, seed: int, workers: int, a) -> dict:
    k = len(np.unique(y))
    tag = f"{atlas.stem}-{method}-s{seed}-w{workers}-{time.time_ns()}"
    out_dir = a.work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{tag}.{'npz' if method == 'cicl_no_training' else 'h5ad'}"
    run_dir = a.work / "ray"
    if method == "cicl_no_training":
        cmd = [sys.executable, __file__, "no-training-job", str(atlas), str(k), str(seed), str(out)]
    else:
        cmd = cicl_command(method, atlas, k, seed, out, workers, run_dir)
    m = run_measured(cmd, a.timeout, out_dir / f"{tag}.log")
    row = {"wall_s": m.wall_s, "driver_rss_mb": m.driver_mb, "tree_rss_mb": m.tree_mb}
    row["worker_rss_mb"] = _rank_peaks(run_dir / tag / "shards", m.ray_worker_mb)
    if m.rc != 0:
        print(m.stderr, file=sys.stderr)
        return {**row, "status": f"exit {m.rc}"}
    if method == "cicl_no_training":
        with np.load(out, allow_pickle=False) as f:
            labels, uns = f["labels"].astype(object), {}
    else:
        labels, uns = read_fit(out)
    row.update(score(labels, y))
    row["train_cells_per_s"] = train_rate(uns) if uns else np.nan
    if not a.keep_outputs:
        out.unlink(missing_ok=True)
        shutil.rmtree(run_dir / tag, ignore_errors=True)
    return {**row, "status": "ok"}


def _rank_peaks(shards: Path, polled: float) -> float:
    """The largest Ray worker's peak RSS (MB): each rank's own ``ru_maxrss`` file when the run
    wrote one, else what polling saw."""
    files = sorted(shards.glob("maxrss_rank*.txt")) if shards.exists() else []
    return max(float(f.read_text()) for f in files) if files else polled


def run_scanpy(atlas: Path, y: np.ndarray, seed: int, a) -> list[dict]:
    """The three scanpy rows from one subprocess: shared steps' time + each method's own."""
    k = len(np.unique(y))
    out_dir = a.work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{atlas.stem}-scanpy-s{seed}-{time.time_ns()}.npz"
    cmd = [sys.executable, __file__, "scanpy-job", str(atlas), str(k), str(seed), str(out)]
    cmd += [a.scanpy_pca, str(a.bisect_steps)]
    m = run_measured(cmd, a.timeout, out.with_suffix(".log"))
    base = {"driver_rss_mb": m.driver_mb, "tree_rss_mb": m.tree_mb, "worker_rss_mb": np.nan}
    if m.rc != 0:
        print(m.stderr, file=sys.stderr)
        return [{**base, "method": me, "status": f"exit {m.rc}"} for me in SCANPY_METHODS]
    with np.load(out, allow_pickle=False) as f:
        res = {key: f[key] for key in f.files}
    t = json.loads(str(res["timings"]))
    overhead = m.wall_s - sum(t.values())  # interpreter start and imports
    shared = overhead + t["read"] + t["preprocess"] + t["pca"]
    own = {
        "scanpy_kmeans": t["kmeans"],
        "scanpy_leiden": t["knn"] + t["leiden"],
        "scanpy_leiden_k": t["knn"] + t["leiden_k"],
    }
    rows = []
    for method, key in zip(SCANPY_METHODS, ("kmeans", "leiden", "leiden_k"), strict=True):
        rows.append(
            {
                **base,
                **score(res[key].astype(object), y),
                "method": method,
                "wall_s": shared + own[method],
                "status": "ok",
            }
        )
    if not a.keep_outputs:
        out.unlink(missing_ok=True)
    return rows


# --- the jobs run in subprocesses ----------------------------------------------------------


def no_training_job(atlas: str, k: int, seed: int, out: str) -> None:
    """The default's final partition on the PCA: preprocessing fitted on a sample as a
    streamed fit does, the final steps on ``cluster.kmeans_sample`` random cells (as
    ``StreamedCells`` picks them in one process), then every cell assigned block by block."""
    import torch

    from cicl.comm import Comm
    from cicl.config import CICLConfig
    from cicl.data.stream import H5adSource
    from cicl.pipeline import prepare_file
    from cicl.train.final import assign_cells, final_partition

    cfg = CICLConfig().with_overrides({"seed": seed, "cluster.n_clusters": k})
    plan = prepare_file(atlas, cfg)
    cfg, n = plan.cfg, plan.n_cells
    src = H5adSource(atlas, np.arange(n), plan.transform)
    block = cfg.train.block_size
    want = min(n, max(plan.k, cfg.cluster.kmeans_sample))
    sample = np.sort(np.random.default_rng(cfg.seed).choice(n, want, replace=False))

    def pcs(idx: np.ndarray) -> torch.Tensor:
        return torch.cat(
            [torch.from_numpy(src.read(idx[i : i + block])[1]) for i in range(0, len(idx), block)]
        )

    h = pcs(sample)
    final, metric = final_partition(h, plan.k, cfg, len(sample), Comm())
    labels = np.concatenate(
        [
            assign_cells(pcs(np.arange(s, min(s + block, n))), final.centroids, metric).numpy()
            for s in range(0, n, block)
        ]
    )
    src.close()
    np.savez(out, labels=labels.astype(str))


def knn_graph_nnd(pcs: np.ndarray, seed: int, n_neighbors: int = 15):
    """scanpy's neighbour graph built from pynndescent's approximate 15-NN (scanpy's own
    pynndescent path fails on scipy's csr_array): UMAP connectivities as scanpy computes
    them, stored where ``sc.tl.leiden`` reads them."""
    import anndata as ad
    from pynndescent import NNDescent
    from scipy import sparse
    from umap.umap_ import fuzzy_simplicial_set

    index = NNDescent(pcs, n_neighbors=n_neighbors, random_state=seed, n_jobs=-1)
    idx, dist = index.neighbor_graph
    conn, _, _ = fuzzy_simplicial_set(
        sparse.coo_matrix((pcs.shape[0], 1)),
        n_neighbors,
        None,
        None,
        knn_indices=idx,
        knn_dists=dist,
    )
    g = ad.AnnData(X=np.zeros((pcs.shape[0], 1), dtype=np.float32))
    g.obsp["connectivities"] = sparse.csr_matrix(conn)
    g.uns["neighbors"] = {
        "connectivities_key": "connectivities",
        "params": {"n_neighbors": n_neighbors, "method": "umap"},
    }
    return g


def leiden_bisect(graph, k: int, seed: int, steps: int) -> np.ndarray:
    """Bisect Leiden's resolution (log scale) until it gives k clusters (or the closest)."""
    from cicl.data.estimate import leiden_labels

    lo, hi, best = 0.01, 10.0, None
    for _ in range(steps):
        res = float(np.sqrt(lo * hi))
        lab = leiden_labels(graph, res, seed)
        n = len(np.unique(lab))
        if best is None or abs(n - k) < abs(best[0] - k):
            best = (n, lab)
        if n == k:
            break
        lo, hi = (res, hi) if n < k else (lo, res)
    return best[1]


def scanpy_job(atlas: str, k: int, seed: int, out: str, solver: str, steps: int) -> None:
    import warnings

    import baselines
    import scanpy as sc

    from cicl.data.estimate import leiden_labels

    warnings.simplefilter("ignore")
    t: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        t[name] = time.perf_counter() - t0
        return time.perf_counter()

    t0 = time.perf_counter()
    a = sc.read_h5ad(atlas)
    t0 = lap("read", t0)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars), flavor="seurat")
    t0 = lap("preprocess", t0)
    sc.pp.pca(a, n_comps=50, svd_solver=solver, random_state=seed, mask_var="highly_variable")
    pcs = np.ascontiguousarray(a.obsm["X_pca"], dtype=np.float32)
    del a
    t0 = lap("pca", t0)
    km = baselines.kmeans_pca(pcs, k, seed)
    t0 = lap("kmeans", t0)
    g = knn_graph_nnd(pcs, seed)
    t0 = lap("knn", t0)
    leiden = leiden_labels(g, 1.0, seed)
    t0 = lap("leiden", t0)
    leiden_k = leiden_bisect(g, k, seed, steps)
    lap("leiden_k", t0)
    np.savez(
        out,
        kmeans=km.astype(str),
        leiden=leiden.astype(str),
        leiden_k=leiden_k.astype(str),
        timings=json.dumps(t),
    )


# --- the report ----------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    ram = np.nan
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def append_rows(path: Path, rows: list[dict]) -> pd.DataFrame:
    new = pd.DataFrame(rows).reindex(columns=COLUMNS)
    old = pd.read_csv(path) if path.exists() else None
    df = new if old is None else pd.concat([old, new], ignore_index=True)
    df.to_csv(path, index=False)
    return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per dataset, size, order, method and worker count (ok rows only)."""
    ok = df[df.status == "ok"]
    key = ["dataset", "cells", "order", "method", "workers"]
    cols = [
        "ari",
        "nmi",
        "rare_f1",
        "k_true",
        "k_found",
        "wall_s",
        "driver_rss_mb",
        "worker_rss_mb",
        "tree_rss_mb",
        "train_cells_per_s",
    ]
    s = ok.groupby(key, dropna=False)[cols].mean().reset_index()
    s["seeds"] = ok.groupby(key, dropna=False).size().to_numpy()
    return s


def to_markdown(df: pd.DataFrame) -> str:
    s = summarise(df)
    order = {m: i for i, m in enumerate(METHODS)}
    lines = [
        "Machines: " + "; ".join(sorted(df.machine.dropna().unique())) + ".",
        f"Runs from {df.date.min()} to {df.date.max()}.",
        "",
    ]
    failed = df[df.status != "ok"]
    for (ds, n), g in s.groupby(["dataset", "cells"]):
        k = int(g.k_true.iloc[0])
        lines += [
            f"**{ds}, {n:,} cells, K = {k}** (mean over seeds)",
            "",
            "| method | order | workers | seeds | ARI | NMI | rare F1 | K found | wall s | "
            "driver MB | worker MB | tree MB | train cells/s |",
            "|" + "---|" * 13,
        ]
        g = g.assign(_o=g.method.map(order), _r=g.order.map({"sorted": 0, "shuffled": 1}))
        g = g.sort_values(["_o", "_r", "workers"])
        for r in g.itertuples():
            lines.append(
                f"| {r.method} | {r.order} | {int(r.workers)} | {r.seeds} | {r.ari:.3f} | "
                f"{r.nmi:.3f} | {_f(r.rare_f1, 3)} | {r.k_found:.0f} | {r.wall_s:.0f} | "
                f"{_f(r.driver_rss_mb, 0)} | {_f(r.worker_rss_mb, 0)} | {_f(r.tree_rss_mb, 0)} | "
                f"{_f(r.train_cells_per_s, 0)} |"
            )
        lines.append("")
    if len(failed):
        lines.append(
            "Failed runs: "
            + ", ".join(
                f"{r.dataset} {r.cells} {r.order} {r.method} s{r.seed} ({r.status})"
                for r in failed.itertuples()
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def _f(v: float, digits: int) -> str:
    return "—" if pd.isna(v) else f"{v:.{digits}f}"


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(df)
    s = s.sort_values(["dataset", "cells", "order", "workers"], ascending=[True, True, False, True])
    size = [f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" for n in s.cells]
    workers = [f" {w:.0f} worker{'s' if w > 1 else ''}" if w > 0 else "" for w in s.workers]
    s["atlas"] = [
        f"{d} {n} {o}{w}" for d, n, o, w in zip(s.dataset, size, s.order, workers, strict=True)
    ]
    methods = [m for m in METHODS if m in set(s.method)]
    atlases = list(dict.fromkeys(s.atlas))
    fig, ax = plt.subplots(1, 3, figsize=(16, 5))
    w = 0.8 / max(len(atlases), 1)
    x = np.arange(len(methods))
    for i, at in enumerate(atlases):
        r = s[s.atlas == at].set_index("method").reindex(methods)
        for a, col in zip(ax, ("ari", "rare_f1", "wall_s"), strict=True):
            a.bar(x + i * w, r[col], w, label=at)
    for a, yl in zip(ax, ("ARI", "mean F1 of types < 1 % of cells", "wall seconds"), strict=True):
        a.set_xticks(x + 0.4 - w / 2)
        a.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        a.set_ylabel(yl)
    ax[0].set_ylim(0, 1.05)
    ax[1].set_ylim(0, 1.05)
    ax[2].set_yscale("log")
    handles, labels = ax[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(atlases), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * ((len(atlases) + 4) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--datasets", nargs="+", default=["cite_cbmc", "young_kidney"])
    ap.add_argument("--cells", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        help=f"any of {', '.join(METHODS)}; 'scanpy' = all three scanpy ones (one subprocess)",
    )
    ap.add_argument("--orders", nargs="+", default=["sorted", "shuffled"])
    ap.add_argument(
        "--shuffled-methods",
        nargs="+",
        default=CICL_METHODS,
        help="methods also run on the shuffled atlas (default: the streamed CICL ones, the "
        "only ones that read blocks in row order)",
    )
    ap.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=[0],
        help="Ray Train workers for the cicl fits (0: one process, no Ray), e.g. 1 2",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/cicl-atlas"))
    ap.add_argument(
        "--mode",
        default="mix",
        choices=["mix", "resample", "nb"],
        help="cicl simulate --mode (mix: no thinned copies of one real cell)",
    )
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--scanpy-pca", default="arpack", help="sc.pp.pca's svd_solver")
    ap.add_argument("--bisect-steps", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per method")
    ap.add_argument("--keep-outputs", action="store_true", help="keep fit outputs in --work")
    a = ap.parse_args(argv)
    global SIM_MODE
    SIM_MODE = a.mode
    if "scanpy" in a.methods:
        a.methods = [m for m in a.methods if m != "scanpy"] + SCANPY_METHODS
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods: {', '.join(unknown)}")
    if "scanpy" in a.shuffled_methods:
        a.shuffled_methods = [m for m in a.shuffled_methods if m != "scanpy"] + SCANPY_METHODS
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "no-training-job":
        no_training_job(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    if argv and argv[0] == "scanpy-job":
        scanpy_job(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5], int(argv[6]))
        return 0
    a = parse(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    csv, where = a.results / "atlas.csv", machine()
    for ds in a.datasets:
        for n in a.cells:
            for seed in a.seeds:
                for order in a.orders:
                    methods = [m for m in a.methods if order == "sorted" or m in a.shuffled_methods]
                    if not methods:
                        continue
                    atlas = ensure_atlas(a.data, a.work, ds, n, seed, order)
                    y = truth(atlas)
                    base = {
                        "dataset": ds,
                        "cells": n,
                        "order": order,
                        "seed": seed,
                        "k_true": len(np.unique(y)),
                        "machine": where,
                    }
                    rows = []
                    for m in (m for m in methods if m in CICL_METHODS):
                        for w in a.workers if m != "cicl_no_training" else [0]:
                            r = {**base, **run_cicl(m, atlas, y, seed, w, a)}
                            rows.append({**r, "method": m, "workers": w})
                            _done(csv, rows[-1])
                    if set(methods) & set(SCANPY_METHODS):
                        for r in run_scanpy(atlas, y, seed, a):
                            if r["method"] in methods:
                                rows.append({**base, **r, "workers": 0})
                                _done(csv, rows[-1])
    df = pd.read_csv(csv)
    (a.results / "atlas.md").write_text(to_markdown(df))
    plot(df, a.results / "atlas.png")
    return 0


DIGITS = {"ari": 4, "nmi": 4, "rare_f1": 4, "wall_s": 1, "train_cells_per_s": 1}


def _done(csv: Path, row: dict) -> None:
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    for key, value in row.items():
        if isinstance(value, float) and not np.isnan(value):
            row[key] = round(value, DIGITS.get(key, 0 if key.endswith("_mb") else 6))
    append_rows(csv, [row])
    keys = ("dataset", "cells", "order", "method", "workers", "ari", "rare_f1", "k_found")
    print({k: row.get(k) for k in (*keys, "wall_s", "driver_rss_mb", "status")}, flush=True)


if __name__ == "__main__":
    sys.exit(main())
