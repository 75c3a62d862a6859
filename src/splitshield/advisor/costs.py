"""What a cut costs in compute: multiply-adds, parameters, weight size, and head latency measured here.

Multiply-adds are PyTorch's own count (:class:`torch.utils.flop_counter.FlopCounterMode`, halved: it counts
a multiply-add as two FLOPs). It counts matrix products and convolutions (and attention), which dominate
any vision model; element-wise work (activations, normalisation, pooling) is not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.split import SplitModel

#: Batch sizes at which the head's latency is measured (one image; a batch of a busy device).
LATENCY_BATCHES = (1, 32)


@dataclass(frozen=True)
class ComputeCost:
    """Compute of one cut, per image.

    Attributes
    ----------
    head_macs, tail_macs:
        Multiply-adds of the head (edge) and of the tail (cloud) for one image.
    head_params:
        Parameters of the head.
    head_mb:
        The head's parameters and buffers, in MB (10⁶ bytes), as stored.
    head_ms, head_ms_b32:
        Wall-clock milliseconds per image of the head on this machine, at batch 1 and at batch 32 (the
        batch's time divided by 32).
    """

    head_macs: int
    tail_macs: int
    head_params: int
    head_mb: float
    head_ms: float
    head_ms_b32: float


@torch.no_grad()
def multiply_adds(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``module(x)`` for the whole batch ``x`` [B, ...], as PyTorch's FLOP counter counts them."""
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of ``module`` (a parameter shared by two submodules counts once)."""
    return sum(p.numel() for p in module.parameters())


def weight_megabytes(module: nn.Module) -> float:
    """Bytes of ``module``'s parameters and buffers as stored, in MB (10⁶ bytes); shared tensors count once."""
    tensors = {t.data_ptr(): t for t in (*module.parameters(), *module.buffers()) if t.numel()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


@torch.no_grad()
def latency_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5, budget_s: float = 0.25) -> float:
    """Milliseconds per image of ``module(x)``, ``x`` [B, ...]: the fastest of up to ``repeats`` timed runs after
    one warm-up run (timeit's rule: the minimum is the run least disturbed by other processes). Timing stops
    after two runs once ``budget_s`` seconds have been spent, so large heads are not run five times."""
    module(x)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
        _synchronize(x.device)
        start = time.perf_counter()
        module(x)
        _synchronize(x.device)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / x.shape[0]


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels: a GPU runs them after the call that launched them returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def cpu_share(seconds: float = 0.03) -> float:
    """The fraction of the CPU its torch threads need that this process gets now: process CPU seconds over wall
    seconds × torch's thread count, while multiplying 256×256 matrices for ``seconds``. Near 1 on an idle machine;
    lower when other processes compete for the cores (or a CPU quota, or more threads than cores), which inflates
    every wall-clock latency measured meanwhile: a multi-threaded operator waits for its slowest thread. Other busy
    threads of this process count too, and can lift it above 1."""
    a = torch.rand(256, 256, generator=torch.Generator().manual_seed(0))
    a @ a
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        a @ a
    return (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())


@torch.no_grad()
def compute_cost(target: SplitModel, batch: torch.Tensor) -> ComputeCost:
    """The :class:`ComputeCost` of ``target`` (in eval mode), measured on ``batch`` [32, C, H, W] in [0, 1]."""
    one = batch[:1]
    z = target.head(one)
    return ComputeCost(
        head_macs=multiply_adds(target.head, one),
        tail_macs=multiply_adds(target.tail, z),
        head_params=parameter_count(target.head),
        head_mb=weight_megabytes(target.head),
        head_ms=latency_ms(target.head, one),
        head_ms_b32=latency_ms(target.head, batch[: LATENCY_BATCHES[1]]),
    )
