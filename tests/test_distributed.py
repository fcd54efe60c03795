"""The pure-torch distributed pieces on a real 2-process gloo group (no Ray): K-means across
shards equals one process, gathered projections carry gradients, the training step runs."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cicl.cluster.kmeans import kmeans, kmeans_pp, lloyd, split_minorities
from cicl.cluster.mixture import refine_full, refine_tied
from cicl.comm import Comm, TorchDistComm


def _blobs(n: int = 601, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, 5, generator=g) * 6
    lab = torch.randint(6, (n,), generator=g)
    return centers[lab] + torch.randn(n, 5, generator=g)


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn: str | Callable) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        (globals()[fn] if isinstance(fn, str) else fn)(TorchDistComm(), out_dir)
    finally:
        dist.destroy_process_group()
    # DDP keeps the gloo group (and its threads) alive past destroy_process_group in torch
    # 2.13, and tearing them down during interpreter shutdown aborts about one run in ten
    # ("terminate called without an active exception", SIGABRT). The rank's work is done and
    # saved, so leave without finalising: the test checks our code, not torch's exit path.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn: str | Callable[[TorchDistComm, str], None], world: int = 2) -> str:
    """Runs ``fn(comm, out_dir)`` on every rank of a ``world``-process gloo group (``fn``: a
    function of this module by name, or a module-level function of another test module);
    returns ``out_dir``, where the ranks save what the test compares."""
    out_dir = tempfile.mkdtemp()
    init_file = os.path.join(out_dir, "pg")
    mp.spawn(_worker, args=(world, init_file, out_dir, fn), nprocs=world, join=True)
    return out_dir


def _split(x: torch.Tensor, rank: int) -> torch.Tensor:
    cut = 250  # unequal shards on purpose
    return x[:cut] if rank == 0 else x[cut:]


def _kmeans_shards(comm: TorchDistComm, out: str) -> None:
    x = _blobs()
    xs = _split(x, comm.rank)
    init = kmeans_pp(xs, 6, torch.Generator().manual_seed(3), comm)
    res = lloyd(xs, init, comm=comm)
    best = kmeans(xs, 6, n_init=3, seed=5, comm=comm)
    torch.save(
        {
            "init": init,
            "cents": res.centroids,
            "labels": res.labels,
            "inertia": res.inertia,
            "best": best.centroids,
        },
        os.path.join(out, f"r{comm.rank}.pt"),
    )


def test_distributed_kmeans_equals_single_process():
    out = _spawn("_kmeans_shards")
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    x = _blobs()
    init = kmeans_pp(x, 6, torch.Generator().manual_seed(3))
    single = lloyd(x, init)
    # k-means++ picks the same points on every rank as in one process
    assert torch.equal(r0["init"], init) and torch.equal(r1["init"], init)
    # Lloyd via all-reduce: the single-process centroids, identical on both ranks
    assert torch.allclose(r0["cents"], single.centroids, atol=1e-5)
    assert torch.equal(r0["cents"], r1["cents"])
    assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), single.labels)
    assert abs(r0["inertia"] - single.inertia) < 1e-6 * single.inertia

    # best of restarts: the same solution (restarts tied in inertia may order centres apart)
    def rows(c: torch.Tensor) -> torch.Tensor:
        return c[torch.argsort(c[:, 0])]

    ref = kmeans(x, 6, n_init=3, seed=5).centroids
    assert torch.allclose(rows(r0["best"]), rows(ref), atol=1e-5)
    assert torch.equal(r0["best"], r1["best"])


def _empty_refill(comm: TorchDistComm, out: str) -> None:
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 5, torch.tensor([[20.0, 20.0]])])
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # third starts empty
    xs = x[:60] if comm.rank == 0 else x[60:]  # the far point lives on rank 1
    res = lloyd(xs, init, comm=comm)
    torch.save(res.centroids, os.path.join(out, f"r{comm.rank}.pt"))


def test_distributed_empty_cluster_refill_agrees_across_ranks():
    out = _spawn("_empty_refill")
    c0, c1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    assert torch.equal(c0, c1)
    assert torch.allclose(c0[2], torch.tensor([20.0, 20.0]))


def _minority_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A big blob holding a small distinct group (label 0) and a second blob (label 1),
    rows shuffled so each rank holds part of every group."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(300, 4, generator=g),
            torch.randn(200, 4, generator=g) + torch.tensor([0.0, 30.0, 0.0, 0.0]),
            torch.randn(12, 4, generator=g) * 0.3 + torch.tensor([12.0, 0.0, 0.0, 0.0]),
        ]
    )
    labels = torch.tensor([0] * 300 + [1] * 200 + [0] * 12)
    perm = torch.randperm(512, generator=g)
    return x[perm], labels[perm]


def _minority_problem_sorted() -> tuple[torch.Tensor, torch.Tensor]:
    """The same, label 1 last: rank 0 (the first 250 rows) holds none of cluster 1."""
    x, labels = _minority_problem()
    order = torch.argsort(labels, stable=True)
    return x[order], labels[order]


def _split_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Cells mixed over both ranks, and sorted so that one rank holds none of a cluster."""
    return {"mixed": _minority_problem(), "sorted": _minority_problem_sorted()}


def _split_shards(comm: TorchDistComm, out: str) -> None:
    for name, (x, labels) in _split_cases().items():
        xs, ls = _split(x, comm.rank), _split(labels, comm.rank)
        got = split_minorities(xs, ls, 2, 3, seed=4, comm=comm)
        torch.save(got, os.path.join(out, f"{name}{comm.rank}.pt"))


def test_distributed_split_minorities_equals_single_process():
    out = _spawn("_split_shards")
    for name, (x, labels) in _split_cases().items():
        got = torch.cat([torch.load(os.path.join(out, f"{name}{r}.pt")) for r in (0, 1)])
        single = split_minorities(x, labels, 2, 3, seed=4)
        assert torch.equal(got, single), name
        assert int((single == 2).sum()) == 12, name  # the small group


def _stretched() -> tuple[torch.Tensor, torch.Tensor]:
    """Three types along one axis, every cell scattered along a shared slanted direction, and
    the K-means partition that cuts across it (the refinement's starting point)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (601,), generator=g)
    z = torch.randn(601, 2, generator=g) * torch.tensor([4.0, 0.4])
    z = z @ torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
    x = torch.cat(
        [torch.stack([y * 4.0, torch.zeros(601)], 1) + z, torch.randn(601, 3, generator=g)], 1
    )
    return x, kmeans(x, 3, n_init=3, seed=0).labels


def _refine_shards(comm: TorchDistComm, out: str) -> None:
    x, start = _stretched()
    res, metric = refine_tied(_split(x, comm.rank), _split(start, comm.rank), 3, comm=comm)
    torch.save(
        {"labels": res.labels, "whiten": metric.whiten}, os.path.join(out, f"r{comm.rank}.pt")
    )


def test_distributed_tied_refinement_equals_single_process():
    out = _spawn("_refine_shards")
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    x, start = _stretched()
    single, metric = refine_tied(x, start, 3)
    assert not torch.equal(single.labels, start)  # the refinement moved cells
    assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), single.labels)
    assert torch.equal(r0["whiten"], r1["whiten"])
    assert torch.allclose(r0["whiten"], metric.whiten, atol=1e-8)


def _broad_and_tight() -> tuple[torch.Tensor, torch.Tensor]:
    """A broad type and two tight ones beside it, and the shared-covariance partition that
    gives the tight types the broad one's near cells (the per-cluster step's starting point)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (601,), generator=g)
    means = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    sd = torch.tensor([1.5, 0.3, 0.3])[y][:, None]
    x = means[y] + sd * torch.randn(601, 3, generator=g)
    return x, refine_tied(x, kmeans(x, 3, n_init=3, seed=0).labels, 3)[0].labels


def _refine_full_shards(comm: TorchDistComm, out: str) -> None:
    x, start = _broad_and_tight()
    res, metric = refine_full(_split(x, comm.rank), _split(start, comm.rank), 3, comm=comm)
    torch.save(
        {"labels": res.labels, "whiten": metric.whiten, "logdet": metric.logdet},
        os.path.join(out, f"r{comm.rank}.pt"),
    )


def test_distributed_full_refinement_equals_single_process():
    out = _spawn("_refine_full_shards")
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    x, start = _broad_and_tight()
    single, metric = refine_full(x, start, 3)
    assert not torch.equal(single.labels, start)  # the per-cluster step moved cells
    assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), single.labels)
    assert torch.equal(r0["whiten"], r1["whiten"]) and torch.equal(r0["logdet"], r1["logdet"])
    assert torch.allclose(r0["whiten"], metric.whiten, atol=1e-8)
    assert torch.allclose(r0["logdet"], metric.logdet, atol=1e-8)


def _gather_grad(comm: TorchDistComm, out: str) -> None:
    z = torch.full((2, 3), float(comm.rank + 1), requires_grad=True)
    g = comm.gather_grad(z)
    (g * torch.arange(4.0)[:, None]).sum().backward()  # every rank: same global loss
    torch.save(z.grad, os.path.join(out, f"r{comm.rank}.pt"))


def test_gather_grad_sends_gradients_back_to_the_owner():
    out = _spawn("_gather_grad")
    g0, g1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    # rows 0,1 belong to rank 0, rows 2,3 to rank 1; both ranks' losses add up (x world)
    assert torch.allclose(g0, 2 * torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.allclose(g1, 2 * torch.tensor([[2.0] * 3, [3.0] * 3]))


def test_identity_comm():
    c = Comm()
    t = torch.arange(3.0)
    assert c.rank == 0 and c.world == 1
    assert torch.equal(c.sum(t), t) and torch.equal(c.gather(t), t)


def _train_two_ranks(comm: TorchDistComm, out: str) -> None:
    from cicl.train.loop import train

    x, pcs, cfg = _tiny_problem(seed=0, per_class=60, genes=40)
    sl = slice(0, 90) if comm.rank == 0 else slice(90, 180)
    rounds: list[dict] = []
    res = train(x[sl], pcs[sl], 3, cfg, comm=comm, on_round=lambda r, ck: rounds.append(ck))
    w = next(iter(rounds[-1]["model"].values()))
    bn = {k: v for k, v in res.encoder_state.items() if "running" in k}  # BatchNorm stats
    torch.save(
        {"labels": res.labels, "w": w, "steps": res.steps, "rng": rounds[-1]["rng_aug"], "bn": bn},
        os.path.join(out, f"r{comm.rank}.pt"),
    )


def test_two_rank_training_keeps_models_in_sync():
    out = _spawn("_train_two_ranks")
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt"), weights_only=False) for r in (0, 1))
    assert torch.equal(r0["w"], r1["w"])  # DDP: identical weights after training
    # BatchNorm's running statistics are each rank's own until averaged: equal, so both ranks
    # embed (and K-means clusters) their cells with one normalisation
    assert r0["bn"] and all(np.allclose(r0["bn"][k], r1["bn"][k]) for k in r0["bn"])
    assert r0["steps"] == r1["steps"] == 4 * 3  # 180 cells / global batch 60, 4 epochs
    assert r0["rng"].shape[0] == 2  # every rank's augmentation RNG is checkpointed
    from sklearn.metrics import adjusted_rand_score

    labels = np.concatenate([r0["labels"], r1["labels"]])
    assert adjusted_rand_score(np.repeat(np.arange(3), 60), labels) > 0.9


def _comm_devices(comm: TorchDistComm, out: str) -> None:
    n = torch.tensor(comm.rank + 1, dtype=torch.long)  # CPU counts, as train() passes them
    flags = torch.tensor([True, comm.rank == 1])  # bool masks, as the cluster loss gathers
    s, g, b = comm.sum(n), comm.gather(flags), comm.broadcast(torch.tensor([comm.rank]), src=1)
    torch.save({"s": s, "g": g, "b": b, "n": n}, os.path.join(out, f"r{comm.rank}.pt"))


def test_collectives_hand_back_new_tensors_on_the_callers_device():
    """Collectives return new tensors (values, dtypes, bool masks) on the caller's device and
    never write into the input. On gloo every tensor is a CPU one; the CUDA side (NCCL, CPU
    counts and RNG draws moved over and back) is checked on a GPU by
    ``benchmarks/gpu_fit.py --dist-check``."""
    out = _spawn("_comm_devices")
    for r in (0, 1):
        got = torch.load(os.path.join(out, f"r{r}.pt"))
        assert got["n"].item() == r + 1  # input untouched
        assert got["s"].item() == 3 and got["s"].device.type == "cpu"
        assert got["g"].tolist() == [True, False, True, True] and got["g"].dtype == torch.bool
        assert got["b"].tolist() == [1]


def _tiny_problem(seed: int = 1, per_class: int = 40, genes: int = 30):
    """Three separated blobs, their PCA and a tiny fast config (one batch = a third of them)."""
    from cicl.config import CICLConfig

    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(3), per_class)
    n = 3 * per_class
    x = (rng.normal(0, 3, (3, genes))[lab] + rng.normal(0, 1, (n, genes))).astype(np.float32)
    pcs = np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :5] * 10
    cfg = CICLConfig().with_overrides(
        {
            "model.encoder": "mlp",
            "model.embed_dim": 8,
            "train.epochs": 4,
            "train.batch_size": per_class,
            "train.device": "cpu",
            "cluster.recluster_every": 2,
            "cluster.n_init": 2,
        }
    )
    return x, pcs, cfg


def test_resume_in_one_process_continues_exactly_and_survives_a_foreign_rng_state():
    """A checkpoint resumes to the uninterrupted run's labels; one whose augmentation RNG came
    from another kind of device (a CUDA generator's state is 16 bytes) resumes with a fresh
    stream instead of failing."""
    from cicl.train.loop import train

    x, pcs, cfg = _tiny_problem()
    rounds: list[dict] = []
    full = train(x, pcs, 3, cfg, on_round=lambda r, ck: rounds.append(ck))  # kept in memory
    first = rounds[0]
    assert first["epoch"] == 2
    again = train(x, pcs, 3, cfg, restore=first)
    assert np.array_equal(again.labels, full.labels) and again.steps == full.steps
    foreign = dict(first, rng_aug=torch.zeros(1, 16, dtype=torch.uint8))
    other = train(x, pcs, 3, cfg, restore=foreign)
    assert other.steps == full.steps and len(np.unique(other.labels)) == 3


def _bn_case() -> tuple[torch.Tensor, torch.Tensor, torch.nn.BatchNorm1d]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 5, generator=g) * 3 + 1
    w = torch.randn(64, 5, generator=g)  # a per-cell loss weight, so gradients are not trivial
    bn = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(5, generator=g))
    return x, w, bn


def _global_bn(comm: TorchDistComm, out: str) -> None:
    from cicl.model.modules import global_batch_norm

    x, w, bn = _bn_case()
    m = global_batch_norm(torch.nn.Sequential(bn), comm)
    cut = 24  # unequal shards
    sl = slice(0, cut) if comm.rank == 0 else slice(cut, None)
    xs = x[sl].clone().requires_grad_(True)
    y = m(xs)
    (y * w[sl]).sum().backward()  # this rank's part of the global loss
    torch.save(
        {"y": y.detach(), "gx": xs.grad, "gw": m[0].weight.grad, "rm": m[0].running_var},
        os.path.join(out, f"r{comm.rank}.pt"),
    )


def test_global_batch_norm_equals_one_process_batch_norm():
    # 2 ranks holding 24 + 40 cells of one batch: outputs, input gradients, summed weight
    # gradients and running statistics are those of BatchNorm1d over all 64 cells
    out = _spawn("_global_bn")
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    x, w, bn = _bn_case()
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    assert torch.allclose(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([r0["gx"], r1["gx"]]), x.grad, atol=1e-5)
    assert torch.allclose(r0["gw"] + r1["gw"], bn.weight.grad, atol=1e-4)
    assert torch.allclose(r0["rm"], bn.running_var) and torch.allclose(r1["rm"], bn.running_var)
