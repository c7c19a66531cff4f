"""`airatings train` under torchrun: the rank's place in the job, the process group, batch
statistics over every rank, rank 0 deciding for the others, and a launcher whose exit code
is the job's (0 / 2 / 75).

- :func:`from_env` reads what torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``). ``WORLD_SIZE`` unset or 1: ``None``, and training never touches
  ``torch.distributed`` (the 1-process path is the one it always was).
- :func:`process_group`: gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``); the
  rendezvous address comes from torchrun's ``MASTER_ADDR``/``MASTER_PORT`` (``env://``).
- :class:`CpuSyncBatchNorm`: ``nn.SyncBatchNorm`` runs on GPUs only (its kernels,
  ``batch_norm_stats`` and friends, have no CPU implementation in torch 2.14). On CPU the
  statistics are all-reduced by an autograd function whose backward all-reduces the
  gradients, so autograd gives the gradient of the global batch.
- :class:`Leader` / :func:`follow`: only rank 0 claims the run's advisory lock, reads and
  writes the database, checkpoints and history. It broadcasts its decision (train this run /
  return this summary / raise this error) before training and its outcome after, so every
  rank exits with the same code.
- ``python -m jobs.distributed <torchrun arguments>``: torchrun itself (``torch.distributed.run``)
  exits 1 for any failed worker. This launcher runs torchrun's own ``run`` and exits with the
  workers' code instead: 2 if a rank exited 2 (bad input: ``podFailurePolicy`` must not
  retry it), 1 if one hit a bug, else 75 (a killed rank, a lost peer, a rendezvous timeout:
  transient; the re-run resumes from ``last.pt``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, JobError, TransientError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Dist | None:
    """The torchrun job this process is a rank of, or None when it runs alone."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        if world <= 1:
            return None
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK") or 0)
        local_world = int(env.get("LOCAL_WORLD_SIZE") or world)
    except (KeyError, ValueError) as exc:
        from jobs.errors import ConfigError

        raise ConfigError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} says this is one rank of a distributed job, "
            f"but RANK/LOCAL_RANK/LOCAL_WORLD_SIZE are missing or not integers ({exc}); start "
            "it with torchrun, or unset WORLD_SIZE to train in one process"
        ) from None
    if not 0 <= rank < world:
        from jobs.errors import ConfigError

        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Dist(rank, world, local_rank, local_world)


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(ctx: Dist, device_type: str) -> Iterator[None]:
    """Join the job's process group (``env://``: torchrun's MASTER_ADDR/MASTER_PORT) for the
    block; destroyed on the way out. A rendezvous that fails is transient (exit 75)."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    try:
        with peer_loss_is_transient():
            dist.init_process_group(
                backend_for(device_type), rank=ctx.rank, world_size=ctx.world_size
            )
    except ValueError as exc:  # MASTER_ADDR/MASTER_PORT missing
        raise TransientError(f"cannot join the distributed job: {exc}") from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


_PEER_LOST = re.compile(
    r"gloo/transport|connection (reset|closed|refused)|broken pipe|nccl|socket timeout",
    re.IGNORECASE,
)


@contextlib.contextmanager
def peer_loss_is_transient() -> Iterator[None]:
    """A collective that fails because another rank died or the network broke: exit 75."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        # gloo reports a dead peer as a plain RuntimeError from its transport (seen in DDP's
        # reducer: "gloo/transport/tcp/pair.cc: Read error ...: Connection reset by peer")
        if not isinstance(exc, dist.DistError) and not _PEER_LOST.search(str(exc)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransientError(
            f"another rank of the distributed job failed or became unreachable ({first}); "
            "the run is not marked failed: a re-run resumes from last.pt"
        ) from None


# ---- rank 0 decides -----------------------------------------------------------------------


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled: only for small control messages)."""
    import torch.distributed as dist

    box = [obj]
    with peer_loss_is_transient():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _portable(exc: BaseException) -> BaseException:
    """The error a follower raises for rank 0's ``exc``: the same JobError (same message, same
    exit code); anything else (a bug, an interrupt) as a transient failure naming it."""
    if isinstance(exc, JobError) and type(exc).__module__.startswith("jobs."):
        return exc
    return TransientError(f"rank 0 stopped: {type(exc).__name__}: {exc}")


class Leader:
    """Rank 0's side of the protocol. The followers wait for one message before training
    (:meth:`start`, or :meth:`close` with a summary or an error when there is nothing to
    train) and, when training returned, one after it (:meth:`close`). While training runs,
    the ranks meet in collectives only: a failure there ends this process and the followers'
    next collective fails (exit 75)."""

    def __init__(self, ctx: Dist):
        self.ctx = ctx
        self.phase = "before"  # before -> training -> after -> closed

    def start(self, run: Any) -> None:
        broadcast(("train", run))
        self.phase = "training"

    def trained(self) -> None:
        self.phase = "after"

    def close(self, outcome: tuple[str, Any]) -> None:
        if self.phase in ("before", "after"):
            self.phase = "closed"
            broadcast(outcome)


def lead(ctx: Dist, body: Callable[[Leader], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` on rank 0 and tell the followers how it ended."""
    leader = Leader(ctx)
    try:
        out = body(leader)
    except BaseException as exc:
        with contextlib.suppress(TransientError):  # a follower already gone: say the real error
            leader.close(("raise", _portable(exc)))
        raise
    leader.close(("return", out))
    return out


def follow(ctx: Dist, train: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A rank > 0: wait for rank 0's decision, train alongside it, end as it ends."""
    kind, payload = broadcast()
    if kind == "raise":
        raise payload
    if kind == "return":
        return payload
    train(payload)
    kind, payload = broadcast()
    if kind == "raise":
        raise payload
    return {**payload, "rank": ctx.rank}


# ---- batch statistics over every rank -------------------------------------------------------


def _cpu_sync_bn_class() -> type:
    import torch
    import torch.distributed as dist
    from torch import nn

    class _AllReduceSum(torch.autograd.Function):
        """all_reduce(SUM) whose backward all-reduces the gradient (what the deprecated
        ``torch.distributed.nn.functional.all_reduce`` does; torch's functional collectives
        have no autograd all_reduce)."""

        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            out = t.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return _AllReduceSum.apply(grad)

    class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
        """BatchNorm whose training statistics are those of the global batch (every rank's
        rows), on CPU. In eval mode, or outside a process group, it is plain BatchNorm."""

        def _check_input_dim(self, input: torch.Tensor) -> None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            syncing = self.training and dist.is_initialized() and dist.get_world_size() > 1
            if not syncing:
                return super().forward(x)
            dims = [0, *range(2, x.dim())]
            shape = [1, -1] + [1] * (x.dim() - 2)
            local_n = x.numel() // x.size(1)
            packed = torch.cat([x.sum(dims), x.new_tensor([float(local_n)])])
            packed = _AllReduceSum.apply(packed)
            n = float(packed[-1].detach())
            if n <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training (global batch)"
                )
            mean = packed[:-1] / n
            centered = x - mean.view(shape)
            var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
            y = centered * torch.rsqrt(var + self.eps).view(shape)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    f = (
                        1.0 / float(self.num_batches_tracked)
                        if self.momentum is None
                        else self.momentum
                    )
                    self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                    self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)), alpha=f)
            return y

    return CpuSyncBatchNorm


_CPU_SYNC_BN: type | None = None


def cpu_sync_batchnorm_class() -> type:
    global _CPU_SYNC_BN
    if _CPU_SYNC_BN is None:
        _CPU_SYNC_BN = _cpu_sync_bn_class()
    return _CPU_SYNC_BN


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for CPU: every BatchNorm*d becomes a
    :class:`CpuSyncBatchNorm` holding the same parameters and buffers (same state_dict keys,
    so checkpoints load into a plain model)."""
    import torch
    from torch import nn

    cls = cpu_sync_batchnorm_class()
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_cpu_sync_batchnorm(child))
    return out


def sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Batch statistics over the global batch: torch's SyncBatchNorm on CUDA, ours on CPU."""
    from torch import nn

    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_cpu_sync_batchnorm(model)


# ---- the launcher -------------------------------------------------------------------------


def exit_code_for(codes: list[int]) -> int:
    """The job's exit code for the failed workers' codes (a signal is negative)."""
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    if 1 in codes:
        return 1
    return EXIT_TRANSIENT


def launch(argv: list[str] | None = None) -> int:
    """torchrun (``torch.distributed.run``) with the job's exit codes."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    args = torchrun.parse_args(argv)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = exit_code_for(codes)
        rank, first = exc.get_first_failure()
        print(
            f"error: rank {rank} failed first (exit code {first.exitcode}; all failed: "
            f"{sorted(codes)}); exiting {code}",
            file=sys.stderr,
        )
        return code
    except (RendezvousError, SignalException) as exc:
        print(f"error: {type(exc).__name__}: {exc}; exiting {EXIT_TRANSIENT}", file=sys.stderr)
        return EXIT_TRANSIENT
    return 0


if __name__ == "__main__":
    sys.exit(launch())
