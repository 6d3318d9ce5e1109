"""Data parallelism under torchrun: the process group, and the model as the training loop sees it.

Launched with `torchrun --nproc_per_node N lmforge train ...`, every process reads RANK, WORLD_SIZE and
LOCAL_RANK from the environment; NCCL is used on CUDA, gloo on CPU. Every DDP / FSDP2 detail lives here:

    init_distributed / shutdown   join and leave the process group (nothing to do in one process)
    DistInfo                      rank, world size, local rank
    wrap(model, ...)              the `Parallel` for a run: `Parallel` (one process), `DDP` or `FSDP`
    Parallel                      what the loop asks of it, the same for every kind:
        .parallel_model             the module to run forward/backward through
        .no_sync(sync)              skip the gradient all-reduce on the non-final micro-steps of an accumulation
        .full_model()               the weights as plain tensors, for saving (collective under FSDP)
        .full_optimizer_state(opt)  / .load_optimizer_state(opt, sd): optimizer state in the unsharded layout
        .can_generate               whether the model can run alone on one rank (sampling during training)
        .grad_average               how many ranks the backward averages gradients over (1, or the world size)
        .sharded                    whether checkpoints are written sharded, each rank its own part (FSDP: DCP)
        .gather_objects(obj)        every rank's picklable obj, in rank order (a list; one process: [obj])
        .sum / .mean / .any / .barrier   the collectives the loop needs, on the right device for the backend
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's obj (small and picklable, e.g. a path) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Parallel:
    """One process: the model runs as it is and every collective is the identity.

    The data-parallel kinds below override only what differs. `model` is always the plain module
    (parameters, config, generation); `parallel_model` is what forward and backward go through.
    """

    grad_average = 1  # the backward of a rank's loss gives that rank's gradient as it is
    sharded = False  # checkpoints: one full copy written by rank 0 (DDP, one process)

    def __init__(self, model: torch.nn.Module, info: DistInfo, device: torch.device):
        self.model, self.info, self.device = model, info, device
        self.parallel_model: torch.nn.Module = model

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def can_generate(self) -> bool:
        return True

    def no_sync(self, sync: bool):
        """Context for one micro-step's backward; sync=False on all but the last micro-step of a step."""
        return contextlib.nullcontext()

    def full_model(self):
        """What `save_weights` needs (`.config`, `.state_dict()`) with plain tensors. Every rank must call it."""
        return self.model

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, sd: dict) -> None:
        opt.load_state_dict(sd)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over ranks (a new tensor on x's device)."""
        if not self.info.enabled:
            return x
        x = x.detach().to(self._comm_device, copy=True)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """x averaged over ranks."""
        return self.sum(x) / self.info.world if self.info.enabled else x

    def any(self, flag: bool) -> bool:
        """True on every rank if flag is True on any rank (so all ranks stop together)."""
        if not self.info.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        barrier(self.info)

    def gather_objects(self, obj) -> list:
        """Every rank's obj (small, picklable), in rank order, on every rank."""
        if not self.info.enabled:
            return [obj]
        out = [None] * self.info.world
        dist.all_gather_object(out, obj)
        return out

    @property
    def _comm_device(self) -> torch.device:
        """NCCL only moves CUDA tensors; gloo moves CPU tensors."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class DDP(Parallel):
    """DistributedDataParallel: every rank holds the whole model; gradients are averaged in the backward."""

    def __init__(self, model, info, device):
        super().__init__(model, info, device)
        from torch.nn.parallel import DistributedDataParallel

        self.parallel_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        self.grad_average = info.world

    def no_sync(self, sync: bool):
        return contextlib.nullcontext() if sync else self.parallel_model.no_sync()


class FSDP(Parallel):
    """FSDP2: each block, then the root, sharded over ranks (parameters are DTensors; gradients are averaged).

    Checkpoints are sharded (`sharded`): each rank writes its own part with DCP (train/checkpoint.py)."""

    sharded = True

    def __init__(self, model, info, device):
        super().__init__(model, info, device)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # older PyTorch
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        self.grad_average = info.world

    @property
    def can_generate(self) -> bool:
        return False  # a sharded model cannot run on one rank alone

    def no_sync(self, sync: bool):
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def full_model(self):
        return _FullStateModel(self.model)

    def full_optimizer_state(self, opt):
        sd = opt.state_dict()
        sd["state"] = {i: {k: _full(v) for k, v in st.items()} for i, st in sd["state"].items()}
        return sd

    def load_optimizer_state(self, opt, sd):
        """Each state tensor is re-sharded like its parameter."""
        from torch.distributed.tensor import distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            state[i] = {
                k: distribute_tensor(v, p.device_mesh, p.placements) if hasattr(p, "device_mesh") and v.dim() > 0 else v
                for k, v in st.items()
            }
        opt.load_state_dict({**sd, "state": state})


def wrap(model: torch.nn.Module, parallel: str, info: DistInfo, device: torch.device) -> Parallel:
    """The Parallel for a run: the model alone in one process, else DDP or FSDP2 (parallel = "ddp" | "fsdp")."""
    if not info.enabled:
        return Parallel(model, info, device)
    return FSDP(model, info, device) if parallel == "fsdp" else DDP(model, info, device)


def _full(t):
    """A plain tensor from an FSDP2 shard (DTensor) by gathering it; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _FullStateModel:
    """A model's config and state dict with FSDP shards gathered to full tensors (gathering is collective).

    A tensor under several names (a tied head) is gathered once and stays shared, so it is saved once."""

    def __init__(self, model):
        self.config = model.config
        gathered = {}
        self._sd = {}
        for k, v in model.state_dict(keep_vars=True).items():  # keep_vars: a tied weight is one object
            if id(v) not in gathered:
                gathered[id(v)] = _full(v.detach())
            self._sd[k] = gathered[id(v)]

    def state_dict(self):
        return self._sd
