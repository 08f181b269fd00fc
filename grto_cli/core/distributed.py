"""The processes of one run: which share of the work is this process's, and how the shares meet.

``accelerate launch -m grto_cli train ...`` (or torchrun) starts N processes; accelerate's state
reads the launcher's environment and joins the process group (gloo on CPU, NCCL on GPUs). A plain
``grto train`` is the one-process case: every method below is then a no-op or the identity, so
there is one code path. Trainable modules are wrapped by ``accelerator.prepare_model`` (DDP: the
gradient of each backward is averaged over processes).

Work is split in whole units (a query's group of rollouts, a generation batch) by position in the
global order, and gathered back in that order, so N processes compute what one does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch


SUPPORTED_ENGINES = ("DistributedType.MULTI_GPU", "DistributedType.MULTI_CPU")


def check_supported(engine: str, mixed_precision: str) -> None:
    """DDP on GPUs or CPUs, with grto's own precision; anything else is refused before it runs.

    >>> check_supported("DistributedType.FSDP", "no")
    Traceback (most recent call last):
    ...
    ValueError: accelerate's DistributedType.FSDP is not used by grto: launch with configs/accelerate/ddp.yaml; to shard a full fine-tune that does not fit one GPU, set train.sharding: fsdp or zero3 (grto applies FSDP2 or DeepSpeed ZeRO-3 itself)
    """
    if engine not in SUPPORTED_ENGINES:
        raise ValueError(f"accelerate's {engine} is not used by grto: launch with configs/accelerate/ddp.yaml; to "
                         f"shard a full fine-tune that does not fit one GPU, set train.sharding: fsdp or zero3 (grto "
                         f"applies FSDP2 or DeepSpeed ZeRO-3 itself)")
    if mixed_precision not in ("no", "MixedPrecisionType.NO"):
        raise ValueError(f"accelerate's mixed precision ({mixed_precision}) would change the math behind grto's "
                         f"back: launch with --mixed_precision no and set policy.dtype")


class Processes:
    """This process's place in the run; ``Processes()`` is a lone process."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world_size = accelerator.num_processes if accelerator else 1
        # Every process must run every unit's policy forwards (a sharded policy: core/engines).
        self.lockstep = False

    @classmethod
    def from_environment(cls, cpu: bool = False) -> "Processes":
        """The launcher's processes when there are several (the process group is joined here), else a
        lone process; ``cpu`` keeps every process on the CPU (gloo)."""
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        if state.num_processes == 1:
            return cls()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # Unused parameters: a mixture-of-experts policy leaves unrouted experts out of a forward.
        accelerator = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        check_supported(str(accelerator.distributed_type), str(accelerator.mixed_precision))
        return cls(accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device | None:
        """The device the launcher gave this process (None for a lone process: the caller's choice)."""
        return self.accelerator.device if self.accelerator else None

    def in_order(self, n: int, work: Callable[[int], Any]) -> Iterator[Any]:
        """``work(0), ..., work(n - 1)``, yielded in that order on every process, computed by turns:
        unit i runs on process i % world_size, and each round's results are gathered before they
        are yielded (so results stream; a round holds world_size units in memory). In lockstep, a
        process without a unit in the last round runs the last unit again and drops the result."""
        for start in range(0, n, self.world_size):
            i = start + self.rank
            mine = work(i) if i < n else None
            if i >= n and self.lockstep:
                work(n - 1)
            if not self.distributed:
                yield mine
                continue
            results: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(results, mine)
            yield from results[:min(self.world_size, n - start)]

    def in_batches(self, items: Sequence[Any], size: int, work: Callable[[Sequence[Any], int], list]) -> Iterator[Any]:
        """``work(batch, start)`` for consecutive batches of ``size`` items (``start``: the batch's first
        item's index), spread over processes by ``in_order``; every result, in item order."""
        def batch(k: int) -> list:
            return work(items[k * size:(k + 1) * size], k * size)

        for results in self.in_order(-(-len(items) // size), batch):
            yield from results

    def block(self, n: int, what: str = "units") -> slice:
        """This process's contiguous block of ``n`` units; ``n`` must split evenly."""
        if n % self.world_size:
            raise ValueError(f"{n} {what} do not split evenly over {self.world_size} processes: "
                             f"choose a multiple of {self.world_size}")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def sum(self, value: float) -> float:
        """The sum over processes of a number (every process gets it)."""
        return self.sums({"value": value})["value"]

    def sums(self, values: dict[str, float]) -> dict[str, float]:
        """Each number's sum over processes, in one all-reduce (every process gets them)."""
        if not self.distributed:
            return dict(values)
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return dict(zip(values, tensor.tolist()))

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every process's list, concatenated in rank order (every process gets it)."""
        if not self.distributed:
            return list(items)
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` made to synchronise its gradients (accelerate's DDP); itself for a lone process."""
        if not self.distributed:
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    def no_sync(self, module: torch.nn.Module):
        """Accumulate DDP's gradients locally (no all-reduce) inside this block."""
        if not self.distributed or not hasattr(module, "no_sync"):
            return contextlib.nullcontext()
        return module.no_sync()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()
