"""Data-parallel training across processes (torchrun, or SLURM tasks): everything the run needs
to know about the other ranks, in one place.

    torchrun --nproc_per_node=K -m growrun train [OVERRIDES]                  # one node, K ranks
    growrun train hydra/launcher=... hydra.launcher.tasks_per_node=K ...      # submitit (SLURM)

Each rank trains on its contiguous 1/K share of every global batch (trainer.batch_size is the
global batch; it must divide by K) through DistributedDataParallel, so the gradient is the
global batch's mean gradient. At a growth event (growrun.train.events) every rank takes
its share of the statistics batches and of the line-search batch; the statistics, which are
sums (SiteStats.tensors()), are summed across ranks, and every loss the line search compares is
the global batch's mean, so all ranks take the same decisions from the same numbers; after the
surgery the DDP wrapper is rebuilt, which broadcasts rank 0's parameters and buffers, so all
ranks continue from identical weights. Epoch metrics and evaluation are summed across ranks.
Only rank 0 writes (CSV logs, checkpoints, summary.json) and holds the run-directory lock.

BatchNorm normalises over each rank's share (as DDP does; no SyncBatchNorm), so a K-process run
of a BatchNorm model is not the single-process run; without BatchNorm it is, up to float32
summation order (tests/test_distributed.py).

Single process: `Single(device)`, whose methods are identities. Backend: nccl on CUDA (each rank
on cuda:LOCAL_RANK, made current before the group is created), gloo on CPU. The ranks agree on
stops and timed checkpoints every AGREE_EVERY steps (run.py), not after every step.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from growrun.errors import GrowrunError

_PEER_GONE = ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL", "timed out", "Timed out")
# ranks agree on a stop or a timed checkpoint after every AGREE_EVERY-th step (and at epoch ends):
# one all-reduce and host sync per AGREE_EVERY steps instead of per step; a stop signal is acted
# on within that many steps
AGREE_EVERY = 16
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("GROWRUN_DIST_TIMEOUT_MIN", "30")))


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without them. In a
    SLURM job of several tasks started by submitit (hydra/launcher with tasks per node > 1),
    submitit's TorchDistributedEnvironment first exports them (MASTER_ADDR: the first node)."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


class Single:
    """One process: nothing to share."""
    rank, world, local_rank, active = 0, 1, 0, False
    agree_every = 1  # agree() after every step: free in one process

    def __init__(self, device: torch.device | None = None):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor across ranks, in place."""

    def max_int(self, value: torch.Tensor) -> int:
        return int(value)

    def any(self, flag: bool) -> bool:
        return flag

    def agree(self, due: bool, stop: bool) -> tuple[bool, bool]:
        """(rank 0's `due`, any rank's `stop`): one decision for all ranks, taken after every
        `agree_every`-th step and at epoch ends (a host sync each time on CUDA)."""
        return due, stop

    def gather(self, value) -> list | None:
        """[every rank's value] on rank 0 (picklable, small; tensors moved to the CPU first),
        None on the other ranks."""
        return [value]

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers (BatchNorm running statistics) rank 0's."""

    def share(self, value):
        return value

    def close(self, clean: bool = True) -> None:
        pass


class ProcessGroup(Single):
    """K processes joined by torch.distributed (env:// rendezvous, as torchrun sets it up).
    `device` is this rank's (rank_device): on CUDA it is made the current device before the
    group exists, so that NCCL's communicator and every collective use this rank's GPU."""
    active = True
    agree_every = AGREE_EVERY

    def __init__(self, device: torch.device, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if device.type == "cuda" else {}
        try:
            tdist.init_process_group(backend, timeout=TIMEOUT, **extra)
        except (RuntimeError, ValueError) as ex:
            raise GrowrunError(f"distributed run (WORLD_SIZE={self.world}): cannot join the other ranks "
                               f"({str(ex).splitlines()[0][:200]}); launch with torchrun") from None

    def shard(self, batch):
        """This rank's contiguous share of a global batch (shares differ by at most one row)."""
        x, y = batch
        return x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]

    def sum_(self, tensors):
        """In place; a tensor that is not contiguous (a permuted einsum result, a channels_last
        view) is reduced through a contiguous copy (NCCL needs dense, row-major memory)."""
        for t in tensors:
            if t.is_contiguous():
                tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            else:
                dense = t.contiguous()
                tdist.all_reduce(dense, op=tdist.ReduceOp.SUM)
                t.copy_(dense)

    def max_int(self, value):
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
        return int(value)

    def any(self, flag):
        return self.max_int(torch.tensor(int(flag), device=self.device)) > 0

    def agree(self, due, stop):
        flags = torch.tensor([int(due and self.is_main), int(stop)], device=self.device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def wrap(self, model):
        """The DDP wrapper of the model as it is now. Parameters with no entries (a site at width
        0: its empty L1 and BatchNorm never reach the loss) are left out of DDP's reduction,
        which otherwise waits for their gradients and fails at the second step."""
        empty = [name for name, p in model.named_parameters() if p.numel() == 0]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, empty)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model):
        for b in model.buffers():
            tdist.broadcast(b, src=0)

    def gather(self, value):
        out = [None] * self.world if self.is_main else None
        tdist.gather_object(value, out, dst=0)
        return out

    def share(self, value):
        """rank 0's value of a picklable object, on every rank."""
        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, clean: bool = True):
        """Leave the group; after a clean run first wait for every rank (tearing the group down
        while another rank still uses it aborts that rank: 'terminate called without an active
        exception')."""
        if tdist.is_initialized():
            if clean:
                try:
                    tdist.barrier()
                except (RuntimeError, ValueError):
                    pass
            tdist.destroy_process_group()


def connect(device: torch.device) -> Single:
    """The other ranks (torchrun's environment) or Single; `.device` is this process's device."""
    rank, world, local_rank = world_from_env()
    if world <= 1:
        return Single(device)
    return ProcessGroup(rank_device(device, local_rank), rank, world, local_rank)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: cuda:LOCAL_RANK for CUDA, made the current device (before the process
    group is created: NCCL binds its communicator to the current device); `device` otherwise.
    An explicit device=cuda:N is refused: with several ranks the index is torchrun's."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise GrowrunError(f"device={device}: with several ranks each rank uses cuda:LOCAL_RANK; use device=cuda "
                           "or auto (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if local_rank >= torch.cuda.device_count():
        raise GrowrunError(f"LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                           "start at most that many ranks per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_batch(batch_size: int, dist: Single) -> None:
    if batch_size % dist.world:
        raise GrowrunError(f"trainer.batch_size={batch_size}: must divide by the {dist.world} ranks "
                           f"(each rank trains on an equal share of every batch)")


def lost_peer(ex: BaseException, dist: Single) -> GrowrunError | None:
    """The one-line error for a collective that failed because another rank is gone."""
    text = str(ex)
    if not dist.active or not isinstance(ex, RuntimeError) or not (
            isinstance(ex, tdist.DistError) or any(k in text for k in _PEER_GONE)):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(ex).__name__
    return GrowrunError(f"rank {dist.rank}: lost contact with the other ranks ({first}); the last checkpoint is "
                        "kept; relaunch the same torchrun command with resume=true hydra.run.dir=<the run dir>")


def run_dir_of_rank0(run_dir: Path, dist: Single) -> Path:
    return Path(dist.share(str(run_dir)))


def rank_arguments(args) -> None:
    """Adjust `growrun train`'s parsed Hydra arguments for a rank of a torchrun launch: a sweep
    (-m) is refused (launch one torchrun per run); ranks other than 0 get a throw-away run
    directory without .hydra/ or logs (they train in rank 0's directory, which run() receives
    from rank 0, and write nothing)."""
    rank, world, _ = world_from_env()
    if world <= 1:
        return
    if args.multirun:
        raise GrowrunError(f"-m: a sweep cannot run inside torchrun (WORLD_SIZE={world}); launch one torchrun "
                           "per run, or sweep with hydra/launcher=... and tasks per node")
    if rank > 0:
        scratch = tempfile.mkdtemp(prefix=f"growrun-rank{rank}-")
        args.overrides = [*args.overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled",
                          "hydra/hydra_logging=disabled", f"hydra.run.dir={scratch}"]
