"""The closed registry of engines (``train.sharding``) and the one way the trainer gets one."""

from __future__ import annotations

from grto_cli.core.distributed import Processes
from grto_cli.core.engines.base import Engine
from grto_cli.core.engines.fsdp import FsdpEngine
from grto_cli.core.engines.zero3 import Zero3Engine

ENGINES: dict[str, type[Engine]] = {"none": Engine, "fsdp": FsdpEngine, "zero3": Zero3Engine}
SHARDINGS = tuple(ENGINES)


def build(sharding: str, processes: Processes, max_grad_norm: float, lora: bool) -> Engine:
    """The engine ``train.sharding`` names; a sharded one only for a full fine-tune over processes."""
    engine = ENGINES[sharding](processes, max_grad_norm)
    if engine.sharded and (lora or not processes.distributed):
        raise ValueError(f"train.sharding: {sharding} shards a full fine-tune (train.lora: null) over several "
                         f"processes (accelerate launch --num_processes N); LoRA and a lone process use "
                         f"sharding: none")
    processes.lockstep = engine.sharded  # every process runs every forward of a sharded policy
    return engine
