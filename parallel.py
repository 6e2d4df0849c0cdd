"""Many GPUs (or CPU processes) with torchrun: data parallel OnlineVPO.

    torchrun --nproc_per_node 8 train.py --model opensora --reward videoscore --n 4 --k 200           # DDP
    torchrun --nproc_per_node 8 train.py --model wan --fsdp ...                                       # FSDP2

Each rank owns an equal share of every optimizer step's prompts, samples and scores its own N candidates and
computes the DPO loss on its own pairs; only gradients are reduced (DDP all-reduce, or FSDP2 reduce-scatter).
Policy and reference start identical on every rank and the reference is updated at the same step everywhere,
so they stay identical. The one rule that keeps the collectives matched: every rank makes the SAME number of
network calls per step (`stand_in`: a zero-weight pair where a rank has only ties).
On CPU the gloo backend runs the same code (CI runs two processes).
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import dpo

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: str) -> str:
    """Join the process group torchrun made (nccl on GPUs, gloo on CPU); returns this rank's device."""
    if WORLD == 1:
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return RANK == 0


def warn(message: str):
    """One `warning:` line on stderr, from rank 0 only (every rank meets the same condition); on a line of its own
    while a progress bar is drawn (tqdm.write moves the bar below it)."""
    if is_main():
        tqdm.write(f"warning: {message}", file=sys.stderr)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def total(value: int, device) -> int:
    """The sum over ranks."""
    if WORLD == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return int(t.item())


def all_true(flag: bool, device) -> bool:
    """True on every rank iff True on all: a NaN anywhere skips the step everywhere."""
    return total(int(not flag), device) == 0


def gather(obj) -> list:
    """Every rank's Python object, in rank order (metrics, offline pairs)."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def merge_logs(per_rank: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Every rank's (metric lists, phase seconds): lists joined, each phase timed by its slowest rank."""
    logs, times = zip(*per_rank)
    log = {key: [v for one in logs for v in one[key]] for key in logs[0]}
    return log, {key: max(one[key] for one in times) for key in times[0]}


def stand_in(pairs: list, prompt: str, shape: tuple, segments: int = 1) -> tuple[list, float]:
    """(pairs, weight) for the DPO step. A rank whose prompts all tied (or sampled NaN) still makes the step's
    network calls, on one zero-weight pair of zeros: otherwise DDP's and FSDP2's collectives wait forever."""
    if pairs or WORLD == 1:
        return pairs, 1.0
    z = torch.zeros(shape)
    return [dpo.Pair(0, prompt, z, z, torch.ones(segments))], 0.0


# ----------------------------------------------------------------------------------------------------------
# Wrapping: DDP for models that fit on one GPU, FSDP2 (fully_shard) for those that do not


def two_experts(net: nn.Module) -> bool:
    """Wan2.2-A14B's denoiser (diffusers_models.TwoExperts): two transformers, transformer and transformer_2."""
    return hasattr(net, "transformer_2")


def block_lists(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks: every entry of the network's top-level ModuleLists (STDiT3's spatial_blocks and
    temporal_blocks, CogVideoX's transformer_blocks, Wan's blocks; each expert's for Wan2.2-A14B's TwoExperts).
    Each becomes one FSDP2 unit."""
    parts = [net.transformer, net.transformer_2] if two_experts(net) else [net]
    return [block for part in parts for child in part.children() if isinstance(child, nn.ModuleList) for block in child]


def shard(net: nn.Module, dtype: torch.dtype):
    """FSDP2: parameters sharded across ranks and all-gathered one block at a time. With bf16 compute the gathered
    weights are bf16 (half the traffic) and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in block_lists(net):
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)


def wrap(model, fsdp: bool) -> nn.Module:
    """The module the DPO / ReFL loss calls with gradients. DDP wraps model.dit (sampling keeps calling the bare
    network: no gradients, nothing to sync); FSDP2 shards model.dit in place, so every call goes through it."""
    if fsdp:
        shard(model.dit, model.dtype)
        return model.dit
    if WORLD == 1:
        return model.dit
    from torch.nn.parallel import DistributedDataParallel

    ids = [model.device.index] if model.device.type == "cuda" else None
    # wan2.2-14b's TwoExperts: a rank whose samples all sit on one side of the boundary leaves the other expert
    # without gradients this step, which DDP must be told of (it then reduces zeros for it)
    return DistributedDataParallel(model.dit, device_ids=ids,  # broadcasts rank 0's weights
                                   find_unused_parameters=two_experts(model.dit))


def plain_class(net: nn.Module) -> type:
    """The network's own class (fully_shard swaps in a subclass FSDP<class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))


@contextlib.contextmanager
def gradient_sync(net: nn.Module, on: bool):
    """Accumulate over a step's micro-batches locally; reduce once, on the last backward."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and not on:
        with net.no_sync():
            yield
        return
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(on)
    yield


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: full (unsharded) state dicts, so a checkpoint made with 8 GPUs resumes on 1 and vice versa

def state_dicts():
    """torch.distributed.checkpoint's state-dict functions, imported when a checkpoint is written or read (a second
    of imports that `python train.py --help` need not pay)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def full(cpu_offload: bool = True, strict: bool = True):
    return state_dicts().StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)


def savable(net: nn.Module) -> nn.Module | None:
    """A module whose state_dict is the whole network, for save_weights: the network itself, or for an FSDP2-sharded
    one a plain CPU twin built on rank 0 from the gathered weights (collective: every rank calls it; others get
    None)."""
    if not hasattr(net, "reshard"):
        return net
    state = state_dicts().get_model_state_dict(net, options=full())
    return plain_twin(net, state) if is_main() else None


def plain_twin(net: nn.Module, state: dict) -> nn.Module:
    """A plain module of the network's own class and config holding `state` (no copy: the tensors are assigned)."""
    cls = plain_class(net)
    with torch.device("meta"):
        twin = cls.from_config(net.config) if hasattr(cls, "from_config") else cls(**net.config)
    twin.load_state_dict(state, assign=True)
    return twin


def optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names, unsharded (the same file whatever the number of ranks)."""
    return state_dicts().get_optimizer_state_dict(net, opt, options=full())


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict):
    # strict=False: a parameter that has had no gradient yet has no AdamW state to save (wan2.2-14b's low-noise
    # expert while every DPO timestep fell above the boundary) and starts without one again, as it would have
    state_dicts().set_optimizer_state_dict(net, opt, state, options=full(cpu_offload=False, strict=False))
