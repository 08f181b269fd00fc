"""Each SAM2 tool kind trained by GRPO's trainer: the GRTO tool step lowers the loss and leaves the
parts inside the cached features bit-identical, a killed run resumes bit for bit, and the embedded
default's CLI (pretrain -> bootstrap -> b-grto -> export -> predict) runs it and names its kind.
"sam2-hf" is transformers' Sam2Model; "sam2" is Meta's package (grto[sam2]), skipped without it.
Each kind's own file tests what is its own: parity with its reference pipeline, loading, what trains."""

import importlib.util
import json
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import yaml

from grto_cli.core.checkpoint import RunDir, load_system, load_system_weights, save_system, system_paths
from grto_cli.core.data.records import read_manifest
from grto_cli.core.rollout import SamplingParams
from grto_cli.core.tool_kinds import load_tool, tool_kind
from grto_cli.core.trainer import RLConfig, Schedule, Trainer
from test_train_cli import _cli

TEMPLATE = "Locate: {query}."


def _perturb(parameters, seed=1, scale=0.3):
    """Random init's masks are nearly flat (weights ~0.02): make them depend on the prompt."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn_like(p) * scale)


def _save_sam2_hf(out):
    from grto_cli.core.sam2_hf import Sam2HfTool
    from grto_cli.core.tiny import tiny_sam2_hf

    model, processor = tiny_sam2_hf(64, seed=0)
    _perturb(model.parameters())
    Sam2HfTool(model, processor).save(out)


def _save_sam2(out):
    from grto_cli.core.sam2_meta import Sam2Tool
    from grto_cli.core.tiny import tiny_sam2

    model, config = tiny_sam2(64, seed=0)
    _perturb([*model.sam_prompt_encoder.parameters(), *model.sam_mask_decoder.parameters()])
    Sam2Tool(model, config).save(out)


@dataclass(frozen=True)
class Kind:
    name: str
    save: Callable  # writes a perturbed tiny tool of this kind into a directory
    frozen: tuple[str, ...]  # state-dict prefixes inside the cached features (never trained)
    decoder: str  # the trained mask decoder's prefix
    tool_lr: float
    needs: str | None = None  # a package the kind needs


KINDS = {
    "sam2-hf": Kind("sam2-hf", _save_sam2_hf,
                    ("vision_encoder.", "mask_decoder.conv_s0.", "mask_decoder.conv_s1.", "no_memory"),
                    "mask_decoder.", tool_lr=1e-3),
    "sam2": Kind("sam2", _save_sam2,
                 ("image_encoder.", "sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.", "no_mem_embed",
                  "memory_"), "sam_mask_decoder.", tool_lr=1e-2, needs="sam2"),
}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request):
    k = KINDS[request.param]
    if k.needs and importlib.util.find_spec(k.needs) is None:
        pytest.skip(f"the {k.name} kind needs the {k.needs} package (grto[{k.needs}])")
    return k


@pytest.fixture(scope="module")
def kind_system(kind, tiny_system, tmp_path_factory):
    """The tests' tiny system with the kind's tiny tool."""
    out = tmp_path_factory.mktemp(f"system_{kind.name}")
    shutil.copytree(tiny_system / "policy", out / "policy")
    kind.save(out / "tool")
    assert tool_kind(out / "tool") == kind.name
    return out


def _trainer(kind, system, synthetic_data, method="grto"):
    policy, tool = load_system(system_paths(system), TEMPLATE)
    assert tool.kind == kind.name
    train, _ = read_manifest(synthetic_data / "train.jsonl")
    val, _ = read_manifest(synthetic_data / "val.jsonl")
    cfg = RLConfig(method=method, queries_per_step=2, sampling=SamplingParams(group_size=4, max_new_tokens=32),
                   micro_batch=3, policy_lr=1e-3, tool_lr=kind.tool_lr)
    return Trainer(cfg, policy, tool, train, val, synthetic_data)


def test_grto_tool_step_lowers_the_loss_and_leaves_the_image_encoder(kind, kind_system, synthetic_data):
    trainer = _trainer(kind, kind_system, synthetic_data)
    model = trainer.tool.model
    frozen = {k: v for k, v in _state(model).items() if k.startswith(kind.frozen)}
    assert frozen, "the kind's frozen prefixes name no weights"
    batch = trainer.rollouts(0)
    assert sum(c is not None for c in batch.calls) >= 2, "the tool step needs parsable calls"
    advantages = torch.zeros(len(batch.calls))
    losses = [trainer.tool_update(batch, advantages)["tool/loss"] for _ in range(6)]  # the same calls each time
    assert losses[-1] < losses[0] - 1e-3, losses
    after = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    start = _state(load_tool(kind_system / "tool").model)
    assert any(not torch.equal(v, start[k]) for k, v in after.items() if k.startswith(kind.decoder))


def test_grto_resumes_bit_identically(kind, kind_system, synthetic_data, tmp_path):
    schedule = Schedule(steps=4, eval_every=0, checkpoint_every=2)
    straight = _trainer(kind, kind_system, synthetic_data)
    straight_metrics = []
    straight.fit(schedule, RunDir(tmp_path / "a", {"run": 1}), lambda s, m: straight_metrics.append(m))

    first = _trainer(kind, kind_system, synthetic_data)
    run = RunDir(tmp_path / "b", {"run": 1})
    run.open()
    first.fit(Schedule(steps=2, eval_every=0, checkpoint_every=2), run)
    assert tool_kind(run.last / "tool") == kind.name
    del first  # the process "dies" here

    resumed = _trainer(kind, kind_system, synthetic_data)
    resumed_metrics = []
    resumed.fit(schedule, run, lambda s, m: resumed_metrics.append(m))
    assert resumed.state.step == 4 and resumed.state.resumed_from == 2 and len(resumed_metrics) == 2
    for a, b in zip(straight_metrics[2:], resumed_metrics):
        a, b = ({k: v for k, v in m.items() if not k.startswith("perf/")} for m in (a, b))  # wall clock differs
        assert a == b
    st, rt = _state(straight.tool.model), _state(resumed.tool.model)
    assert all(torch.equal(st[k], rt[k]) for k in st)
    # the trained tool differs from the start, and a saved system loads back into a built one
    start = _state(load_tool(kind_system / "tool").model)
    assert any(not torch.equal(st[k], start[k]) for k in st)
    save_system(straight.policy, straight.tool, tmp_path / "sys")
    other = _trainer(kind, kind_system, synthetic_data)
    load_system_weights(other.policy, other.tool, tmp_path / "sys")
    assert all(torch.equal(v, st[k]) for k, v in _state(other.tool.model).items())


def test_embedded_default_runs_b_grto_with_a_tiny_sam2(kind, make_project):
    """`--set pretrain.tool_kind=<kind>` pretrains a tiny SAM2 as the base's tool; bootstrap, b-grto,
    export and predict then run it through the Tool interface, and the bundle names its kind."""
    from grto_cli.stages.export import predict

    project = make_project(f"project_{kind.name}")
    r = _cli(["pretrain", "--out", "models/sam2base", "--set", f"pretrain.tool_kind={kind.name}",
              "--set", "pretrain.sam.steps=3", "--set", "pretrain.sam.batch_size=2", "--set", "pretrain.sft.steps=1",
              "--set", "pretrain.sft.batch_size=2", "--set", "pretrain.parallel=false"], project)
    assert r.exit_code == 0, r.output
    assert tool_kind(project / "models/sam2base/tool") == kind.name
    # the tests' tiny policy emits parsable calls; its tool becomes the pretrained tiny SAM2
    shutil.rmtree(project / "models/base/tool")
    shutil.copytree(project / "models/sam2base/tool", project / "models/base/tool")
    r = _cli(["bootstrap", "--set", "bootstrap.max_queries=4", "--set", "bootstrap.rollouts_per_query=4",
              "--set", "bootstrap.steps=2", "--set", "bootstrap.batch_size=2"], project)
    assert r.exit_code == 0, r.output
    assert tool_kind(project / "models/bootstrap/tool") == kind.name
    r = _cli(["train", "--method", "b-grto", "--steps", "2", "--set", "train.queries_per_step=2",
              "--set", "train.sampling.group_size=4", "--set", "train.sampling.max_new_tokens=32",
              "--set", "train.eval_every=0", "--set", "train.checkpoint_every=1", "--set", "train.micro_batch=4"],
             project)
    assert r.exit_code == 0, r.output
    trained, boot = (load_tool(project / d / "tool") for d in ("models/trained", "models/bootstrap"))
    assert trained.kind == kind.name
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                     boot.model.state_dict().values())), "b-grto trained the tool"
    r = _cli(["export", "--checkpoint", "models/trained", "--out", "bundles/sam2"], project)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((project / "bundles/sam2/grto.yaml").read_text())["tool"]["kind"] == kind.name
    image = next((project / "data/prepared/synthetic").rglob("*.png"))
    result = predict(str(project / "bundles/sam2"), str(image), "the red circle", str(project / "mask.png"), "cpu")
    assert result["tool_kind"] == kind.name and (project / "mask.png").is_file()
    json.dumps(result)
