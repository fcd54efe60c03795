"""Collective operations the training step and K-means need, as one small interface.

``Comm()`` is the single-process identity; ``TorchDistComm`` uses an initialised
``torch.distributed`` process group (gloo on CPU, NCCL on GPU) — the one Ray Train sets up, or
one from ``torchrun``. The maths code only ever talks to this interface, so the same training
step runs in one process, inside Ray workers and on a GPU box without Ray.
"""

from __future__ import annotations

import torch


class Comm:
    """Identity collectives for one process (rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor; the input is not modified)."""
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0, rank order, no gradient."""
        return t

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        """As ``gather`` but gradients flow back to every rank's slice."""
        return t

    def sum_grad(self, t: torch.Tensor) -> torch.Tensor:
        """As ``sum`` but gradients flow back to every rank's summand."""
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        return None


class TorchDistComm(Comm):
    """Collectives over the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # NCCL moves only CUDA tensors, gloo is used here for CPU ones; callers pass either
        # (counts and random draws live on the CPU, embeddings on the training device), so
        # each collective runs on the backend's device and hands back the caller's
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def _on(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on the backend's device (never ``t`` itself: collectives write)."""
        return t.to(self.device, copy=True).contiguous()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        out = self._on(t)
        self._dist.all_reduce(out, op=op)
        return out.to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.MAX)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, self._dist.ReduceOp.MIN)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        mine = self._on(t)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._dist.all_gather(parts, mine)
        return torch.cat(parts).to(t.device)

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        return _GatherGrad.apply(t.contiguous(), self)

    def sum_grad(self, t: torch.Tensor) -> torch.Tensor:
        return _SumGrad.apply(t.contiguous(), self)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = self._on(t)
        self._dist.broadcast(out, src=src)
        return out.to(t.device)

    def barrier(self) -> None:
        self._dist.barrier()


def default_comm() -> Comm:
    """The distributed comm when a process group is up, else the identity."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistComm()
    return Comm()


class _GatherGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and hands
    each rank its own slice (as a global loss computed on every rank requires)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, comm: TorchDistComm) -> torch.Tensor:
        ctx.comm, ctx.n = comm, t.shape[0]
        return comm.gather(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = ctx.comm.sum(grad.contiguous())
        start = ctx.comm.rank * ctx.n
        return total[start : start + ctx.n], None


class _SumGrad(torch.autograd.Function):
    """all_reduce (sum) forward; backward all-reduces the gradient, since every rank's loss
    depends on every rank's summand (DDP then averages the parameter gradients)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, comm: TorchDistComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.sum(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.sum(grad.contiguous()), None
