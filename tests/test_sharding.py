"""FSDP's contracts with the rest of the code (core/sharding.py). The math of a sharded run against
one process, resume included, is tests/test_distributed.py's (2 processes, gloo)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from grto_cli.core.distributed import Processes
from grto_cli.core.policy import Policy, generate
from grto_cli.core.sharding import decoder_layers, sharded_fraction


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


def _policy(recorder: _Recorder, sharded: bool) -> Policy:
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    return Policy(model=recorder, processor=SimpleNamespace(tokenizer=tokenizer), coord_convention="absolute",
                  prompt_template="{query}", sharded_root=recorder if sharded else None, lockstep=sharded)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_sharded_policy_generates_in_lockstep_with_its_root_gathered(sharded):
    """Rows end at different steps on different processes, and each step's forward gathers weights
    from every process: without synced_gpus a process that is done stops stepping and the others
    wait forever. The root's own weights (embeddings, LM head) are gathered around generate."""
    recorder = _Recorder()
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    ids, mask = generate(_policy(recorder, sharded), batch, GenerationConfig(max_new_tokens=2))
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


def test_zero3_without_deepspeed_installed_is_a_clear_error(monkeypatch):
    import sys

    from grto_cli.core import zero3

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` meets where it is absent
    with pytest.raises(ValueError, match=r"pip install 'grto\[deepspeed\]'"):
        zero3.initialize(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), 1.0)
