"""What may change when a training run resumes (it is not part of the run's resume key): how long
and how often (``Schedule``), and the compute-for-memory trades that leave the math as it is
(``MemoryParams``); and the loop state a checkpoint carries (``TrainState``)."""

from __future__ import annotations

from dataclasses import dataclass

from grto_cli.core.config import check_choice, check_positive
from grto_cli.core.engines.registry import SHARDINGS
from grto_cli.core.policy import LOGPROB_CHUNK


@dataclass
class Schedule:
    """How long and how often: free to change when a run resumes (raise ``steps`` to extend it)."""

    steps: int = 100
    eval_every: int = 25  # on val; the best val checkpoint becomes the output; 0: never
    eval_limit: int | None = None
    eval_batch_size: int = 50
    checkpoint_every: int = 10  # and at the last step

    def validate(self) -> None:
        check_positive("checkpoint_every", self.checkpoint_every)
        check_positive("eval_batch_size", self.eval_batch_size)
        if self.steps < 0 or self.eval_every < 0:
            raise ValueError(f"steps and eval_every must be >= 0 (eval_every 0: never), got {self.steps} and "
                             f"{self.eval_every}")


@dataclass
class MemoryParams:
    """Compute-for-memory trades that leave the math as it is (free to change when a run resumes)."""

    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing in the policy
    logprob_chunk: int = LOGPROB_CHUNK  # completion tokens whose full-vocabulary logits exist at once
    # none: a whole policy per process (DDP); fsdp / zero3: a full fine-tune's weights, gradients and
    # AdamW states split over the processes, by FSDP2 or DeepSpeed ZeRO-3 (core/engines)
    sharding: str = "none"

    def validate(self) -> None:
        check_choice("sharding", self.sharding, SHARDINGS)
        check_positive("logprob_chunk", self.logprob_chunk)


@dataclass
class TrainState:
    step: int = 0  # steps completed
    best_val_giou: float | None = None
    best_step: int | None = None
    resumed_from: int | None = None
    world_size: int = 1  # processes of the invocation that wrote this state
