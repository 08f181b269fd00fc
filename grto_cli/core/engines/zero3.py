"""DeepSpeed ZeRO-3 for a full fine-tune of the policy over several processes (``train.sharding: zero3``).

The same job as FSDP2 (fsdp.py), by the engine most 7B full fine-tuning recipes use: the
policy's weights, gradients and AdamW states are partitioned over the processes (1/N each), and
each submodule's weights are all-gathered just before its forward (hooks DeepSpeed registers on
every submodule, so ``generate``, which does not enter the root, gathers too) and freed after.
grto builds the engine itself from the process group accelerate or torchrun set up, launched with
``configs/accelerate/ddp.yaml``: accelerate's DeepSpeed plugin would take over the optimiser, the
micro-batching and the loss scaling that grto's math owns.

What the engine is asked to do, so that the math stays one process's:

- ``managed_gradient_accumulation: false``: ``backward`` only accumulates (each micro-batch's
  gradients are reduce-scattered into this process's partition as it goes), ``step`` is the
  boundary: clip to ``train.max_grad_norm`` by the global norm, one AdamW update, zero the
  gradients. No loss is rescaled by an accumulation count (``scale_wrt_gas=False``): the
  trainer's losses already carry the whole batch's normaliser. Gradients are averaged over the
  processes, as DDP's are.
- The optimiser is torch's AdamW (the one every other path uses) on DeepSpeed's flat float32
  partitions; the policy stays float32 (AdamW on bf16 weights is refused before this, as for
  every full fine-tune).
- The frozen reference (``beta > 0``) is an engine without an optimiser: partitioned the same way,
  never a whole extra copy per process.
- Checkpoints hold the whole model in transformers' layout and AdamW's whole state keyed by
  parameter name, in the layout ``FsdpEngine.optimizer_state`` writes, gathered one parameter
  at a time into the main process's CPU memory; loading sends each whole tensor from the main
  process and every process keeps its partition. So a ZeRO-3 run resumes on another number of
  processes, sharded by FSDP, or unsharded, and every stage reads its outputs as any other.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from grto_cli.core.engines.base import Engine, adamw, is_main_process, raise_everywhere

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _config(max_grad_norm: float | None, optimizer: bool) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: grto feeds the engine its own micro-batches
        "zero_optimization": {"stage": 3},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    if optimizer:
        config.update({
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # backward accumulates; step() is the boundary
            "gradient_clipping": float(max_grad_norm or 0.0),
            "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed warns about any client optimiser
        })
    return config


def _deepspeed():
    """The deepspeed package, or a clear error where it is not installed (it is an extra)."""
    import logging

    try:
        import deepspeed
    except ImportError as exc:
        raise ValueError(f"train.sharding: zero3 needs DeepSpeed, which is not installed ({exc}): "
                         f"pip install 'grto[deepspeed]', or set train.sharding: fsdp") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)  # the engine's config dump and per-step lines
    return deepspeed


def initialize(root: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None):
    """``root`` (``rollout.PolicyLogprobs``) as a ZeRO-3 engine that partitions its weights and
    trains them with ``optimizer`` (built on the whole, unpartitioned parameters). Returns
    ``(engine, engine_optimizer)``: call ``engine(...)``, ``backward`` and ``step`` instead of the
    module, ``loss.backward()`` and the optimiser."""
    deepspeed = _deepspeed()
    engine, engine_optimizer, _, _ = deepspeed.initialize(model=root, optimizer=optimizer,
                                                          config=_config(max_grad_norm, optimizer=True),
                                                          dist_init_required=False)
    return engine, engine_optimizer


def initialize_frozen(root: torch.nn.Module) -> torch.nn.Module:
    """A frozen ``root`` (the reference) partitioned over the processes, for forwards only."""
    deepspeed = _deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=root, config=_config(None, optimizer=False), dist_init_required=False)
    engine.eval()  # (the engine's eval() returns None, not the module)
    return engine


def sharded_fraction(model: torch.nn.Module) -> float:
    """The share of the model's weights this process holds (about 1 / N under ZeRO-3)."""
    local = total = 0
    for p in model.parameters():
        total += p.ds_numel if hasattr(p, "ds_id") else p.numel()
        local += p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel()
    return local / max(total, 1)


# ----------------------------------------------------------------------------- whole states


def _broadcast(value: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """The main process's ``value`` on every process (the others pass None)."""
    if is_main_process():
        out = value.to(device=device, dtype=dtype).contiguous()
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    torch.distributed.broadcast(out, src=0)
    return out


def _shape(tensor: torch.Tensor) -> torch.Size:
    return tensor.ds_shape if hasattr(tensor, "ds_id") else tensor.shape


def full_model_state(engine) -> dict[str, torch.Tensor]:
    """The whole model's state dict in transformers' names, on the main process's CPU (every process
    calls this, gathering one parameter at a time; the others get an empty dict)."""
    from deepspeed.runtime.zero import GatheredParameters

    state: dict[str, torch.Tensor] = {}
    for name, tensor in engine.module.model.state_dict(keep_vars=True).items():
        with GatheredParameters([tensor], enabled=hasattr(tensor, "ds_id")):
            if is_main_process():
                state[name] = tensor.detach().to("cpu", copy=True)
    return state


def load_full_model_state(engine, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Put a whole state dict in transformers' names into the partitions: the main process
    ``read()``s it and sends each tensor; every process keeps its partition of the weight and of
    the optimiser's float32 copy of it."""
    from deepspeed.utils import safe_set_full_fp32_param
    from deepspeed.runtime.zero import GatheredParameters

    state = read() if is_main_process() else {}
    expected = engine.module.model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state)) if is_main_process() else []
    raise_everywhere(f"the checkpoint has no weight {missing[0]!r} (of {len(missing)} missing) for the "
                     f"{type(engine.module.model).__name__} policy" if missing else None)
    for name, tensor in expected.items():  # the same order everywhere
        value = _broadcast(state.get(name), _shape(tensor), tensor.dtype, tensor.device)
        if not hasattr(tensor, "ds_id"):  # a buffer: whole on every process
            tensor.data.copy_(value)
            continue
        with GatheredParameters([tensor], modifier_rank=0):
            tensor.data.copy_(value)
        if tensor.requires_grad:
            safe_set_full_fp32_param(tensor, value)


def _adam(engine_optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """torch's AdamW inside the engine's optimiser, and the flat float32 partitions it updates."""
    return engine_optimizer.optimizer, list(engine_optimizer.fp32_partitioned_groups_flat)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def full_optimizer_state(engine, engine_optimizer) -> dict:
    """AdamW's whole state keyed by parameter name (``model.<transformers name>``, as
    ``FsdpEngine.optimizer_state`` writes it), on the main process's CPU; empty before the first
    step. Every process calls this; the others get an empty dict."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adam, flats = _adam(engine_optimizer)
    params = _trainable(engine)
    group = {k: v for k, v in adam.param_groups[0].items() if k != "params"}
    out: dict = {"state": {}, "param_groups": [{**group, "params": [name for name, _ in params]}]}
    if flats[0] not in adam.state:
        return out if is_main_process() else {}
    step = adam.state[flats[0]]["step"]
    for name, p in params:
        states = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_STATES}  # every process gathers
        if is_main_process():
            out["state"][name] = {"step": step.detach().clone().cpu(),
                                  **{key: v.detach().to("cpu", copy=True) for key, v in states.items()}}
    return out if is_main_process() else {}


def load_full_optimizer_state(engine, engine_optimizer, state: dict) -> None:
    """Each process keeps its partition of AdamW's whole state, sent by the main process (the
    others' ``state`` is never read)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    adam, flats = _adam(engine_optimizer)
    saved = state.get("state", {}) if is_main_process() else {}
    # An unsharded run's AdamW state is keyed by position, not by name: refused on every process.
    unnamed = "an unsharded run's checkpoint" if any(not isinstance(k, str) for k in saved) else None
    problem = None
    if unnamed:
        problem = (f"train.sharding: zero3 cannot resume {unnamed} (AdamW's state keyed by position, not by "
                   f"parameter name): resume it with train.sharding: none, or start the sharded run afresh")
    elif saved and (missing := sorted(name for name, _ in _trainable(engine) if name not in saved)):
        problem = f"the checkpoint's optimiser state has no entry for {missing[0]!r} (of {len(missing)} missing)"
    raise_everywhere(problem if is_main_process() else None)
    header = [float(next(iter(saved.values()))["step"]) if saved else None]
    torch.distributed.broadcast_object_list(header, src=0)
    step = header[0]
    if step is None:
        return  # saved before the first step: AdamW has no state yet
    for flat in flats:  # AdamW creates its state at the first step: create it here, then fill it
        entry = adam.state[flat]
        entry["step"] = torch.tensor(step, dtype=torch.float32)
        for key in ADAM_STATES:
            entry.setdefault(key, torch.zeros_like(flat))
    for name, p in _trainable(engine):
        for key in ADAM_STATES:
            value = _broadcast(saved[name][key] if is_main_process() else None, p.ds_shape, torch.float32, p.device)
            safe_set_full_optimizer_state(p, value, key)


class Zero3Engine(Engine):
    name, label, sharded = "zero3", "ZeRO-3", True

    def prepare(self, root: torch.nn.Module, reference: torch.nn.Module | None, lr: float) -> None:
        self.root = root
        self.policy_pass, self.optimizer = initialize(root, adamw(root, lr), self.max_grad_norm)
        self.reference_pass = initialize_frozen(reference) if reference is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (already its share of the whole-batch loss: not rescaled)."""
        self.policy_pass.backward(loss, scale_wrt_gas=False)

    def no_sync(self):
        """Every backward reduce-scatters into this process's partition, which accumulates there."""
        return contextlib.nullcontext()

    def step(self) -> float:
        """Clip, update and zero the gradients; returns the global gradient norm before clipping."""
        self.policy_pass.step()
        return float(self.policy_pass.get_global_grad_norm())

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict]:
        yield {"synced_gpus": True}  # DeepSpeed's hooks gather each submodule's weights themselves

    def model_state(self) -> dict[str, torch.Tensor]:
        return full_model_state(self.policy_pass)

    def load_model_state(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        load_full_model_state(self.policy_pass, read)

    def optimizer_state(self) -> dict:
        return full_optimizer_state(self.policy_pass, self.optimizer)

    def load_optimizer_state(self, state: dict) -> None:
        load_full_optimizer_state(self.policy_pass, self.optimizer, state)

    def sharded_fraction(self) -> float:
        return sharded_fraction(self.root.model)
