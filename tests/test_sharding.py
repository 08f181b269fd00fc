"""The engines' contracts with the rest of the code (core/engines). The math of a sharded run against
one process, resume included, is tests/test_distributed.py's (2 processes, gloo)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from grto_cli.core.distributed import Processes
from grto_cli.core.policy import Policy, generate
from grto_cli.core.engines.fsdp import FsdpEngine, decoder_layers, sharded_fraction


class _Recorder:
    """Stands in for an FSDP root (unshard / reshard) and a model (generate), logging the calls."""

    def __init__(self):
        self.calls = []

    def unshard(self):
        self.calls.append("unshard")

    def reshard(self):
        self.calls.append("reshard")

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        self.calls.append(("generate", kwargs.get("synced_gpus", False)))
        return torch.cat([input_ids, torch.tensor([[5, 2]] * len(input_ids))], dim=1)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_sharded_policy_generates_in_lockstep_with_its_root_gathered(sharded):
    """Rows end at different steps on different processes, and each step's forward gathers weights
    from every process: without synced_gpus a process that is done stops stepping and the others
    wait forever. The root's own weights (embeddings, LM head) are gathered around generate."""
    recorder = _Recorder()
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    policy = Policy(model=recorder, processor=SimpleNamespace(tokenizer=tokenizer), coord_convention="absolute",
                    prompt_template="{query}")
    engine = FsdpEngine(Processes(), 1.0)
    engine.policy_pass = recorder
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    ids, mask = generate(policy, batch, GenerationConfig(max_new_tokens=2),
                         generating=engine.generating if sharded else None)
    assert ids.tolist() == [[5, 2], [5, 2]] and mask.tolist() == [[1, 1], [1, 1]]
    expected = ["unshard", ("generate", True), "reshard"] if sharded else [("generate", False)]
    assert recorder.calls == expected


def test_a_lone_process_in_lockstep_runs_each_unit_once():
    processes = Processes()
    processes.lockstep = True
    ran = []
    assert list(processes.in_order(3, lambda i: ran.append(i) or i)) == [0, 1, 2] and ran == [0, 1, 2]


def test_layers_found_and_an_unsharded_model_is_whole(tiny_system):
    from grto_cli.core.policy import load_policy

    policy = load_policy(tiny_system / "policy")
    layers = decoder_layers(policy.model)
    assert len(layers) == policy.model.config.text_config.num_hidden_layers
    assert sharded_fraction(policy.model) == 1.0
    with pytest.raises(ValueError, match="language_model.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharding_is_refused_with_lora_or_a_lone_process(tiny_system, synthetic_data, sharding):
    from grto_cli.core.data.records import read_manifest
    from grto_cli.core.policy import load_policy
    from grto_cli.core.tool import SamTool, load_sam
    from grto_cli.core.trainer import LoraParams, MemoryParams, RLConfig, Trainer

    records, _ = read_manifest(synthetic_data / "train.jsonl")
    sam, arch = load_sam(tiny_system / "tool")
    for lora in (None, LoraParams()):
        policy = load_policy(tiny_system / "policy")
        with pytest.raises(ValueError, match=f"sharding: {sharding} shards a full fine-tune"):
            Trainer(RLConfig(method="grpo", queries_per_step=2, lora=lora), policy, SamTool(sam, arch), records,
                    records, synthetic_data, memory=MemoryParams(sharding=sharding))
    with pytest.raises(ValueError, match="sharding"):
        MemoryParams(sharding="zero2").validate()
    from grto_cli.core.engines.registry import SHARDINGS

    assert SHARDINGS == ("none", "fsdp", "zero3")  # the closed registry


def test_zero3_without_deepspeed_installed_is_a_clear_error(monkeypatch):
    import sys

    from grto_cli.core.engines import zero3

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` meets where it is absent
    with pytest.raises(ValueError, match=r"pip install 'grto\[deepspeed\]'"):
        zero3.initialize(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), 1.0)


def _agree(rank: int, world: int, port: int, out) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from grto_cli.core.engines.base import raise_everywhere

    try:
        raise_everywhere("the checkpoint has no weight 'lm_head.weight'" if rank == 0 else None)
        out.put((rank, "no error"))
    except ValueError as exc:
        out.put((rank, str(exc)))
    torch.distributed.destroy_process_group()


def test_a_problem_the_main_process_finds_stops_every_process():
    """A bad checkpoint found on the main process alone (a ZeRO-3 load) must stop the others too,
    with the same message, instead of leaving them waiting in the next broadcast."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(rank, 2, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: "the checkpoint has no weight 'lm_head.weight'", 1: "the checkpoint has no weight 'lm_head.weight'"}
