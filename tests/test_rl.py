"""The RL loop on the tiny system: what each method may and may not change, rollouts, resume."""

import numpy as np
import pytest
import torch

from grto_cli.core.data.records import read_manifest
from grto_cli.core.grto import tool_loss
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import SamplingParams
from grto_cli.core.system import checkpoint_paths, load_system
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import SamTool, ToolCall, build_sam
from grto_cli.core.trainer import RLConfig, Trainer, checkpoint_matches

TEMPLATE = "Locate: {query}."


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _trainer(tiny_system, synthetic_data, method, **overrides):
    policy, tool = load_system(checkpoint_paths(tiny_system), TEMPLATE)
    train, _ = read_manifest(synthetic_data / "train.jsonl")
    val, _ = read_manifest(synthetic_data / "val.jsonl")
    settings = dict(method=method, steps=2, queries_per_step=2, sampling=SamplingParams(group_size=4, max_new_tokens=32),
                    micro_batch=3, policy_lr=1e-3, tool_lr=1e-3, eval_limit=2)
    cfg = RLConfig(**{**settings, **overrides})
    return Trainer(cfg, policy, tool, train, val, synthetic_data)


def test_tool_loss_gradients_reach_only_prompt_encoder_and_mask_decoder():
    arch = tiny_sam_arch()
    tool = SamTool(build_sam(arch), arch)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    target = torch.zeros(64, 64, dtype=torch.bool)
    target[10:30, 12:40] = True
    embeddings = tool.embed([image])
    calls = [[ToolCall(box=(10, 8, 42, 33), points=((20, 20),)), None, ToolCall(points=((25, 15),))]]
    loss, n_valid = tool_loss(tool, embeddings, calls, [target])
    loss.backward()
    assert n_valid == 2 and torch.isfinite(loss)
    assert all(p.grad is None for p in tool.sam.image_encoder.parameters())
    for part in (tool.sam.prompt_encoder, tool.sam.mask_decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_rollouts_parse_score_and_share_one_embedding_per_image(tiny_system, synthetic_data):
    trainer = _trainer(tiny_system, synthetic_data, "grpo")
    batch = trainer.rollouts(0)
    n = 2 * 4
    assert batch.completion_ids.shape[0] == n and len(batch.parsed) == n
    assert batch.embeddings.shape[0] == 2  # one encoder pass per image, not per rollout
    assert trainer.tool.sam_embedding_cache.misses == 2
    weights = RewardWeights()
    for p, total, iou in zip(batch.parsed, batch.rewards.total, batch.rewards.iou):
        if not p.format_ok:
            assert total.item() == pytest.approx(-weights.format_penalty) and iou.item() == 0
    assert batch.rewards.format_ok.any(), "the fixture policy should emit some parsable answers"


def test_grpo_trains_policy_and_leaves_tool_bit_identical(tiny_system, synthetic_data):
    trainer = _trainer(tiny_system, synthetic_data, "grpo")
    tool_before, policy_before = _state(trainer.tool.sam), _state(trainer.policy.model)
    for _ in range(2):
        metrics = trainer.step()
        assert all(np.isfinite(v) for v in metrics.values())
    assert _same(tool_before, _state(trainer.tool.sam))
    assert not _same(policy_before, _state(trainer.policy.model))
    assert "tool_loss" not in metrics


def test_grto_trains_prompt_encoder_and_decoder_never_the_image_encoder(tiny_system, synthetic_data):
    trainer = _trainer(tiny_system, synthetic_data, "grto")
    before = _state(trainer.tool.sam)
    steps = [trainer.step() for _ in range(2)]
    after = _state(trainer.tool.sam)
    encoder = [k for k in before if k.startswith("image_encoder.")]
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert sum(m["tool_valid_rollouts"] for m in steps) > 0
    assert all(np.isfinite(m["tool_loss"]) for m in steps)


def test_reference_pass_only_with_kl(tiny_system, synthetic_data):
    assert _trainer(tiny_system, synthetic_data, "grpo").reference is None
    trainer = _trainer(tiny_system, synthetic_data, "grpo", beta=0.1)
    assert trainer.reference is not None
    metrics = trainer.step()
    # First step: the policy still equals the reference, so the k3 KL is zero.
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_resumed_run_matches_uninterrupted_run(tiny_system, synthetic_data, tmp_path):
    straight = _trainer(tiny_system, synthetic_data, "grto", steps=4)
    straight_metrics = [straight.step() for _ in range(4)]

    first = _trainer(tiny_system, synthetic_data, "grto", steps=4)
    for _ in range(2):
        first.step()
    first.save_checkpoint(tmp_path / "last")
    del first  # the process "dies" here

    resumed = _trainer(tiny_system, synthetic_data, "grto", steps=4)
    assert checkpoint_matches(tmp_path / "last", resumed.cfg)
    resumed.load_checkpoint(tmp_path / "last")
    assert resumed.state.step == 2 and resumed.state.resumed_from == 2
    resumed_metrics = [resumed.step() for _ in range(2)]
    assert resumed.state.step == 4
    assert all(np.isfinite(v) for m in resumed_metrics for v in m.values())
    # CPU float math is deterministic here, so the resumed run retraces the uninterrupted one.
    for a, b in zip(straight_metrics[2:], resumed_metrics):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    sp, rp = _state(straight.policy.model), _state(resumed.policy.model)
    assert all(torch.allclose(sp[k], rp[k], atol=1e-5) for k in sp)
    st, rt = _state(straight.tool.sam), _state(resumed.tool.sam)
    assert all(torch.allclose(st[k], rt[k], atol=1e-5) for k in st)


def test_checkpoint_of_another_config_is_not_resumed(tiny_system, synthetic_data, tmp_path):
    trainer = _trainer(tiny_system, synthetic_data, "grto")
    trainer.save_checkpoint(tmp_path / "last")
    assert not checkpoint_matches(tmp_path / "last", _trainer(tiny_system, synthetic_data, "grpo").cfg)
    # Raising the step budget keeps the run resumable (extend a finished run).
    assert checkpoint_matches(tmp_path / "last", _trainer(tiny_system, synthetic_data, "grto", steps=50).cfg)


def test_bad_method_and_top_p_are_refused():
    with pytest.raises(ValueError, match="method"):
        RLConfig(method="ppo").validate()
    with pytest.raises(ValueError, match="top_p"):
        RLConfig(sampling=SamplingParams(top_p=0.9)).validate()


def test_lora_training_checkpoint_loads_back_merged(tiny_system, synthetic_data, tmp_path):
    from PIL import Image

    from grto_cli.core.export import merged_model
    from grto_cli.core.policy import encode_prompts, load_policy
    from grto_cli.core.trainer import LoraParams

    trainer = _trainer(tiny_system, synthetic_data, "grpo", lora=LoraParams(r=4, alpha=8, dropout=0.0), beta=0.05,
                       policy_lr=1e-2)
    assert trainer.reference is None  # with LoRA the reference is the base with adapters disabled
    trainable = [n for n, p in trainer.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    metrics = trainer.step()
    assert np.isfinite(metrics["kl"])
    trainer.save_checkpoint(tmp_path / "last")
    assert (tmp_path / "last/policy/adapter_config.json").is_file()

    loaded = load_policy(tmp_path / "last/policy", prompt_template=TEMPLATE)  # base + adapter, merged
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    batch = encode_prompts(loaded, [image], ["the red circle"])
    trainer.policy.model.eval()
    with torch.no_grad():
        expected = trainer.policy.model(**batch).logits
        assert torch.allclose(loaded.model(**batch).logits, expected, atol=1e-4)
        assert torch.allclose(merged_model(trainer.policy)(**batch).logits, expected, atol=1e-4)
