"""Multi-process training under ``torchrun`` (DistributedDataParallel): NCCL on GPUs, gloo on CPU.

Rank 0 does everything that writes (preprocessing, splits, logs, checkpoints, final
validation); the other ranks train on their own random batches and wait at barriers.
Outside torchrun every call here is a cheap no-op.
"""

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device_type: str) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not dist.is_initialized():
        return network
    from torch.nn.parallel import DistributedDataParallel

    # the lowest deep-supervision head has loss weight 0 and frozen ResNet stages get no
    # gradient: DDP must not wait for those parameters
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def agree(flag: bool) -> bool:
    """Rank 0's decision, for every rank (so no rank stops while another waits)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.broadcast(value, src=0)
    return bool(value.item())


def parameter_checksums(network: torch.nn.Module) -> list:
    """Every rank's sum of parameters: equal values show the ranks stayed in sync."""
    total = torch.tensor([float(sum(p.detach().double().sum() for p in unwrap(network).parameters()))])
    if not dist.is_initialized():
        return [total.item()]
    gathered = [torch.zeros(1, dtype=total.dtype) for _ in range(world_size())]
    dist.all_gather(gathered, total)
    return [g.item() for g in gathered]
