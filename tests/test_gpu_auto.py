"""GPUs used when present (``--gpus-per-worker auto``, the summary's note when they were not)
and the training step's precision (``train.precision``), checked on the CPU."""

import json

import pytest
import torch

from cicl.cli import main
from cicl.cli.parser import build_parser
from cicl.cli.summary import unused_gpus_note
from cicl.comm import Comm
from cicl.distributed import RayOptions, plan_workers, worker_gpus
from cicl.train.plan import autocast_dtype, build_model, train_step


def test_auto_gives_every_worker_a_gpu_or_none():
    assert worker_gpus("auto", 0, 2) == 0.0  # CPU-only cluster: gloo
    assert worker_gpus("auto", 2, 2) == 1.0 and worker_gpus("auto", 8, 2) == 1.0
    assert worker_gpus("auto", 1, 2) == 0.0  # one rank would wait for a GPU forever
    assert worker_gpus(0.0, 8, 2) == 0.0 and worker_gpus(0.5, 0, 2) == 0.5  # as given
    assert RayOptions().gpus_per_worker == "auto"
    with_gpus = plan_workers(2, 8.0, total_gpu=4.0)
    assert with_gpus.gpus == 1.0 and with_gpus.resources()["GPU"] == 1.0
    assert "GPU" not in plan_workers(2, 8.0, total_gpu=0.0).resources()
    assert "GPU" not in plan_workers(2, 8.0, gpus=0, total_gpu=4.0).resources()


def test_fit_plan_reads_the_gpus_of_the_ray_it_is_connected_to():
    """At plan time, after Ray is up: a CPU-only local Ray gives none; one that declares two
    GPUs gives each of two workers one, and none to three."""
    import ray

    from cicl.distributed import fit_plan

    ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert fit_plan(RayOptions(workers=2)).gpus == 0.0
        ray.shutdown()
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
        assert fit_plan(RayOptions(workers=2)).gpus == 1.0
        assert fit_plan(RayOptions(workers=3)).gpus == 0.0
        assert fit_plan(RayOptions(workers=2, gpus_per_worker=0.0)).gpus == 0.0
    finally:
        ray.shutdown()


@pytest.mark.parametrize("command", ["fit", "tune"])
def test_cli_takes_auto_or_a_number(command):
    argv = [command, "in.h5ad"] + (["-o", "out.h5ad"] if command == "fit" else [])
    p = build_parser()
    assert p.parse_args([*argv, "--gpus-per-worker", "auto"]).gpus_per_worker == "auto"
    assert p.parse_args([*argv, "--gpus-per-worker", "0"]).gpus_per_worker == 0.0
    assert p.parse_args([*argv, "--gpus-per-worker", "0.5"]).gpus_per_worker == 0.5
    default = p.parse_args(argv).gpus_per_worker
    assert default == ("auto" if command == "tune" else None)  # fit: None = auto, not given


@pytest.mark.parametrize("bad", ["two", "-1", "nan", "inf", ""])
def test_cli_refuses_garbage_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "in.h5ad", "-o", "out.h5ad", "--workers", "2", "--gpus-per-worker", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: argument --gpus")


def test_fit_without_workers_asks_ray_for_nothing():
    from cicl.cli.fit import ray_options_from

    args = build_parser().parse_args(["fit", "in.h5ad", "-o", "o.h5ad", "--workers", "2"])
    assert ray_options_from(args).gpus_per_worker == "auto"
    args = build_parser().parse_args(["fit", "in.h5ad", "-o", "o.h5ad"])
    assert ray_options_from(args) is None


def test_summary_says_why_gpus_went_unused():
    assert unused_gpus_note({"workers": 1}) is None  # none there, or they were used
    one = unused_gpus_note({"workers": 1, "gpus_unused": 1, "train_device": "cpu"})
    assert one.startswith("  GPUs unused: torch sees 1 GPU(s)") and "train.device=auto" in one
    zero = {"workers": 2, "gpus_unused": 4, "train_device": "auto", "gpus_per_worker": 0.0}
    note = unused_gpus_note(zero)
    assert "Ray cluster has 4 GPU(s)" in note and "--gpus-per-worker 0;" in note
    few = unused_gpus_note({**zero, "workers": 8, "gpus_per_worker": "auto"})
    assert "fewer GPUs than the 8 workers" in few and "\n" not in few


def test_a_cpu_fit_where_torch_sees_a_gpu_says_so(tmp_path, tiny_cfg, capsys, monkeypatch):
    """``train.device=cpu`` on a machine with a GPU (faked: torch is told it has two)."""
    from cicl.data.synthetic import synthetic_adata

    inp, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    synthetic_adata(n_cells=120, n_genes=80, n_clusters=3, seed=1).write_h5ad(inp)
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.with_overrides({"train.device": "cpu", "train.epochs": 2}).to_yaml(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rc = main(["fit", str(inp), "-o", str(out), "-k", "3", "-c", str(cfg), "--json", "-q"])
    cap = capsys.readouterr()
    assert rc == 0
    line = json.loads(cap.out.strip().splitlines()[-1])
    assert line["gpus_unused"] == 2 and line["train_device"] == "cpu"
    assert "GPUs unused: torch sees 2 GPU(s), this fit trained on the CPU" in cap.err


def test_precision_auto_is_bf16_on_cuda_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16  # honoured on CPU (slow, for tests)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert autocast_dtype("auto", cuda) is None  # pre-Ampere: fp32


def _steps(cfg, precision: str, n_steps: int = 3) -> tuple[list, dict]:
    """``n_steps`` training steps from one seed and one batch: the losses and the weights."""
    cfg = cfg.with_overrides({"train.precision": precision})
    torch.manual_seed(0)
    g = 40
    model, net, opt = build_model(g, cfg, None, None, torch.device("cpu"), Comm(), "nb")
    gen = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(32, g, generator=gen), torch.randn(32, g, generator=gen)
    counts = torch.poisson(torch.rand(32, g, generator=gen) * 5, generator=gen)
    pseudo = (torch.randint(3, (32,), generator=gen), torch.ones(32))
    losses = [
        train_step(net, opt, v1, v2, pseudo, cfg, Comm(), (counts, counts.sum(1)))
        for _ in range(n_steps)
    ]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("terms", ["default", "contrastive"])
def test_precision_auto_on_cpu_is_bitwise_fp32_and_bf16_runs(tiny_cfg, terms):
    """auto on the CPU is the fp32 path to the bit; bf16 (autocast on the CPU) trains, with
    finite fp32 losses, and other weights (so the switch reached the forward)."""
    cfg = tiny_cfg
    if terms == "contrastive":  # every term: instance, cluster-aware, reconstruction
        cfg = cfg.with_overrides({"loss.instance_weight": 1.0, "loss.lam": 1.0})
    loss_fp32, w_fp32 = _steps(cfg, "fp32")
    loss_auto, w_auto = _steps(cfg, "auto")
    assert loss_auto == loss_fp32
    assert all(torch.equal(w_auto[k], w_fp32[k]) for k in w_fp32)
    loss_bf16, w_bf16 = _steps(cfg, "bf16")
    assert all(torch.isfinite(torch.tensor(step)).all() for step in loss_bf16)
    assert all(w_bf16[k].dtype == w_fp32[k].dtype for k in w_fp32)  # weights stay fp32
    assert not all(torch.equal(w_bf16[k], w_fp32[k]) for k in w_fp32)
