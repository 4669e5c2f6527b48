"""Data-parallel training under ``torchrun`` / ``accelerate launch`` (DistributedDataParallel).

The launchers set RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the trainer joins the
process group (NCCL on GPUs, gloo on CPU), wraps the model in DDP for each phase and splits
every global batch across ranks. What is random where:
- data order: one seeded permutation, the same on every rank (each rank takes its slice);
- gate noise: the diff's own generator, seeded alike on every rank, so one mask per step;
- dropout: torch's global RNG, seeded with seed + rank, so independent per rank.
Only rank 0 writes (checkpoints, metrics, the diff, results.json); writes stay atomic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or no launcher at all (usable before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def setup(device: str) -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return info


def wrap(model: torch.nn.Module, info: Dist, device: torch.device,
         find_unused: bool = False, ignore: tuple[torch.nn.Parameter, ...] = ()
         ) -> torch.nn.Module:
    """DDP over ``model`` (its trainables change between phases, so wrap once per phase).

    ``find_unused``: some trainables get no gradient in some steps (gates held open).
    ``ignore``: parameters whose gradients are reduced elsewhere (the gates stepped inside
    backward, see ``averager``). Buffers are not synced per forward: the frozen theta0
    buffers are identical on every rank and would otherwise be re-sent every step."""
    if not info.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    skip = {id(p) for p in ignore}
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, p in model.named_parameters() if id(p) in skip])
    ids = [device.index] if device.type == "cuda" else None
    # newer torch renamed the switch (and deprecates the old name)
    name = ("forward_sync_buffers" if "forward_sync_buffers" in
            inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused,
                                   **{name: False})


def averager(info: Dist):
    """None in one process; else ``mean_(tensor)``, an in-place mean across ranks, on a
    process group of its own: it is called inside backward (optim.GateStep), while DDP's
    bucket reductions run on the default group, and a separate group keeps the two streams
    of collectives from interleaving differently on different ranks. Every rank must call
    this at the same point (it creates a group)."""
    if not info.enabled:
        return None
    group = dist.new_group(backend=dist.get_backend())

    def mean_(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)
        t.div_(info.world)
    return mean_


def shard(indices: list, info: Dist) -> list:
    """This rank's slice of a global batch (every rank gets one when len >= world)."""
    return indices[info.rank::info.world]


def any_rank(flag: bool, info: Dist) -> bool:
    """True on every rank when it is true on any (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, info: Dist) -> list:
    """obj from every rank, on every rank (rank order)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def check_same(value, info: Dist, what: str) -> None:
    """Raise on every rank unless ``value`` is equal on all of them (a mismatch, e.g. masks
    projected from gates that diverged, would otherwise leave DDP waiting forever)."""
    values = gather(value, info)
    if len(set(values)) > 1:
        from .errors import DiffPruneError
        raise DiffPruneError(f"the {info.world} processes disagree on the {what} (per rank: "
                             f"{values}); they must train identical copies of the diff")


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: Dist) -> None:
    """Leave together: a rank that tears down while another still talks to it can abort."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
