"""The RL loop on the tiny system: what each method may and may not change, rollouts, log-probs,
loss normalisation under gradient accumulation, the reference, best-on-val, resume."""

import copy

import numpy as np
import pytest
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.checkpoint import RunDir, load_system, save_system, system_paths
from grto_cli.core.data.records import read_manifest
from grto_cli.core.grto import tool_loss
from grto_cli.core.metrics import (LOSS_KL, LOSS_RATIO_MEAN, ROLLOUT_COMPLETION_TOKENS, TOOL_LOSS,
                                   TOOL_VALID_ROLLOUTS, VAL_CIOU, VAL_FORMAT_RATE, VAL_GIOU)
from grto_cli.core.policy import completion_logprobs
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import SamplingParams
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import SamTool, build_sam, load_sam
from grto_cli.core.trainer import LoraParams, RLConfig, Schedule, Trainer

TEMPLATE = "Locate: {query}."


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _trainer(tiny_system, synthetic_data, method, pad_is_eos=False, memory=None, **overrides):
    policy, tool = load_system(system_paths(tiny_system), TEMPLATE)
    if pad_is_eos:  # as many real checkpoints ship: padding with the EOS token
        policy.tokenizer.pad_token = policy.tokenizer.eos_token
    train, _ = read_manifest(synthetic_data / "train.jsonl")
    val, _ = read_manifest(synthetic_data / "val.jsonl")
    settings = dict(method=method, queries_per_step=2, sampling=SamplingParams(group_size=4, max_new_tokens=32),
                    micro_batch=3, policy_lr=1e-3, tool_lr=1e-3)
    cfg = RLConfig(**{**settings, **overrides})
    return Trainer(cfg, policy, tool, train, val, synthetic_data, memory=memory)


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
    # 4 x 8 rollouts: enough parsable calls that some earn a box or point term; every term weighted
    weights = RewardWeights(format=0.5, format_penalty=0.25, iou=1.0, box_iou=0.5, point=0.3)
    trainer = _trainer(tiny_system, synthetic_data, "grpo", queries_per_step=4, rewards=weights,
                       sampling=SamplingParams(group_size=8, max_new_tokens=32))
    batch = trainer.rollouts(0)
    n = 4 * 8
    assert batch.completion_ids.shape[0] == n and len(batch.parsed) == n
    assert batch.embeddings.shape[0] == 4  # one encoder pass per image, not per rollout
    assert trainer.tool.embedding_cache.misses == 4
    r = batch.rewards
    assert r.format_ok.any() and not r.format_ok.all(), "the batch needs parsable and unparsable answers"
    earned = (weights.iou * r.iou + weights.box_iou * r.box_iou + weights.point * r.point)[r.format_ok]
    assert (earned > 0).any(), "a parsable call must earn a term beyond format, or the sum below checks format alone"
    for i, p in enumerate(batch.parsed):
        assert bool(r.format_ok[i]) == p.format_ok == (p.call is not None)
        if p.format_ok:  # the trainer's reward is the documented sum, with the tool's mask IoU in it
            expected = weights.format + weights.iou * r.iou[i] + weights.box_iou * r.box_iou[i] + weights.point * r.point[i]
        else:
            expected = -weights.format_penalty
            assert r.iou[i] == 0 and r.box_iou[i] == 0 and r.point[i] == 0
        assert r.total[i].item() == pytest.approx(float(expected), abs=1e-6)


def test_grpo_trains_policy_and_leaves_tool_bit_identical(tiny_system, synthetic_data):
    trainer = _trainer(tiny_system, synthetic_data, "grpo")
    tool_before, policy_before = _state(trainer.tool.sam), _state(trainer.policy.model)
    for _ in range(2):
        metrics = trainer.step()
        assert all(np.isfinite(v) for v in metrics.values())
    assert _same(tool_before, _state(trainer.tool.sam))
    assert not _same(policy_before, _state(trainer.policy.model))
    assert TOOL_LOSS not in metrics


def test_grto_trains_prompt_encoder_and_decoder_never_the_image_encoder(tiny_system, synthetic_data):
    trainer = _trainer(tiny_system, synthetic_data, "grto")
    before = _state(trainer.tool.sam)
    steps = [trainer.step() for _ in range(2)]
    after = _state(trainer.tool.sam)
    encoder = [k for k in before if k.startswith("image_encoder.")]
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert sum(m[TOOL_VALID_ROLLOUTS] for m in steps) > 0
    assert all(np.isfinite(m[TOOL_LOSS]) for m in steps)


# ----------------------------------------------------------------------------- log-probs


def test_reference_pass_only_with_kl_and_kl_is_zero_at_the_start(tiny_system, synthetic_data):
    assert _trainer(tiny_system, synthetic_data, "grpo").engine.reference_pass is None
    sampling = SamplingParams(group_size=4, temperature=0.7, max_new_tokens=32)
    trainer = _trainer(tiny_system, synthetic_data, "grpo", beta=0.1, sampling=sampling)
    assert trainer.engine.reference_pass is not None
    metrics = trainer.step()
    # First step: the policy still equals the reference, so the k3 KL is zero, if (and only if)
    # both log-probs are taken at the same temperature.
    assert metrics[LOSS_KL] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "dr_grpo"])
def test_gradient_accumulation_gives_the_whole_batch_gradient(tiny_system, synthetic_data, mode):
    """Micro-batches of 3, 3 and 2 sequences accumulate exactly the gradient of one 8-sequence pass:
    the trainer passes one whole-batch normaliser to every micro-batch."""
    trainer = _trainer(tiny_system, synthetic_data, "grpo", loss_mode=mode)
    batch = trainer.rollouts(0)
    lengths = batch.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "completions of different lengths make token weighting matter"
    advantages = torch.linspace(-1.0, 1.0, 8)
    params = [p for p in trainer.policy.model.parameters() if p.requires_grad]
    grads = []
    for micro in (8, 3):
        trainer.cfg.micro_batch = micro
        trainer.policy.model.train()
        trainer.engine.optimizer.zero_grad()
        trainer.accumulate_policy_gradients(batch, advantages, None, None)
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny_system, synthetic_data):
    T = 0.7
    trainer = _trainer(tiny_system, synthetic_data, "grpo", lora=LoraParams(r=4, alpha=8, dropout=0.0), beta=0.05,
                       policy_lr=1e-2, sampling=SamplingParams(group_size=4, temperature=T, max_new_tokens=32))
    assert trainer.engine.reference_pass is None  # no second copy of the model
    for _ in range(2):
        trainer.step()
    batch = trainer.rollouts(2)
    base, _ = load_system(system_paths(tiny_system), TEMPLATE)
    with torch.no_grad():
        expected = completion_logprobs(base.model, batch.prompts, batch.completion_ids, batch.completion_mask, T,
                                       rows=batch.prompt_rows(slice(None)))
    reference = trainer.reference_logprobs(batch)
    current = trainer._logprobs_no_grad(trainer.engine.policy_pass, batch)
    assert not torch.allclose(current, expected, atol=1e-3), "the adapters should have moved the policy"
    # Float rounding only: the reference runs in micro-batches of 3 rows, `expected` in one batch
    # (other GEMM shapes; 4e-5 seen on a log-prob of -3.07), the moved policy is > 1e-3 away.
    assert torch.allclose(reference, expected, atol=1e-4)


def test_pad_equal_to_eos_through_the_trainer(tiny_system, synthetic_data):
    """With pad == eos, each completion still counts every token up to and including its first EOS."""
    trainer = _trainer(tiny_system, synthetic_data, "grpo", pad_is_eos=True)
    eos = trainer.policy.eos_token_id
    assert trainer.policy.pad_token_id == eos
    batch = trainer.rollouts(0)
    ids, mask = batch.completion_ids, batch.completion_mask  # (N, L)
    ended = 0
    for row, m in zip(ids, mask):
        hits = (row == eos).nonzero().flatten()
        length = int(hits[0]) + 1 if len(hits) else ids.shape[1]
        ended += bool(len(hits))
        assert m.tolist() == [1] * length + [0] * (ids.shape[1] - length)
    assert ended > 0, "some completions must end with EOS for the test to mean anything"
    before = _state(trainer.policy.model)
    metrics = trainer.step()
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics[ROLLOUT_COMPLETION_TOKENS] > 0
    assert not _same(before, _state(trainer.policy.model))


# ----------------------------------------------------------------------------- fit, best, resume


def test_fit_keeps_the_best_on_val_system(tiny_system, synthetic_data, tmp_path):
    trainer = _trainer(tiny_system, synthetic_data, "grto")
    scripted = iter([10.0, 30.0, 20.0, 25.0])  # val gIoU at steps 0, 1, 2, 3
    trainer.evaluate_val = lambda limit, batch_size: {VAL_GIOU: next(scripted), VAL_CIOU: 0.0, VAL_FORMAT_RATE: 0.0}
    tools, policies = {}, {}

    def log(step, metrics):
        if VAL_GIOU in metrics:
            tools[step], policies[step] = _state(trainer.tool.sam), _state(trainer.policy.model)

    run = RunDir(tmp_path, {"test": "best"})
    run.open()
    state = trainer.fit(Schedule(steps=3, eval_every=1, checkpoint_every=1), run, log)
    assert state.step == 3 and state.best_step == 1 and state.best_val_giou == 30.0
    best_tool, _ = load_sam(run.best / "tool")
    assert _same(tools[1], best_tool.state_dict())
    best_policy, _ = load_system(system_paths(run.best), TEMPLATE)
    assert _same(policies[1], best_policy.model.state_dict())
    assert not _same(policies[3], best_policy.model.state_dict())  # not simply the last system


def test_resumed_run_matches_uninterrupted_run(tiny_system, synthetic_data, tmp_path):
    schedule = Schedule(steps=4, eval_every=0, checkpoint_every=2)
    straight = _trainer(tiny_system, synthetic_data, "grto")
    straight_metrics = []
    straight.fit(schedule, RunDir(tmp_path / "a", {"run": 1}), lambda s, m: straight_metrics.append(m))

    first = _trainer(tiny_system, synthetic_data, "grto")
    run = RunDir(tmp_path / "b", {"run": 1})
    run.open()
    first.fit(Schedule(steps=2, eval_every=0, checkpoint_every=2), run)
    del first  # the process "dies" here

    resumed = _trainer(tiny_system, synthetic_data, "grto")
    assert run.resumable()
    resumed_metrics = []
    resumed.fit(schedule, run, lambda s, m: resumed_metrics.append(m))
    assert resumed.state.step == 4 and resumed.state.resumed_from == 2 and len(resumed_metrics) == 2
    # CPU float math is deterministic here, so the resumed run retraces the uninterrupted one.
    for a, b in zip(straight_metrics[2:], resumed_metrics):
        a, b = ({k: v for k, v in m.items() if not k.startswith("perf/")} for m in (a, b))  # wall clock differs
        assert a == pytest.approx(b, abs=1e-6)
    sp, rp = _state(straight.policy.model), _state(resumed.policy.model)
    assert all(torch.allclose(sp[k], rp[k], atol=1e-5) for k in sp)
    st, rt = _state(straight.tool.sam), _state(resumed.tool.sam)
    assert all(torch.allclose(st[k], rt[k], atol=1e-5) for k in st)


@pytest.mark.parametrize("field,value,allowed", [
    ("method", "ppo", "grpo"), ("loss_mode", "mean", "token_mean"), ("tool_loss", "dice", "dice_bce"),
    ("tool_weighting", "best", "uniform")])
def test_every_enumerated_option_is_validated_with_its_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}.*{value}.*{allowed}"):
        RLConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match="top_p"):
        RLConfig(sampling=SamplingParams(top_p=0.9)).validate()


def test_lora_training_checkpoint_loads_back_merged(tiny_system, synthetic_data, tmp_path):
    from PIL import Image

    from grto_cli.core.policy import encode_prompts, load_policy

    trainer = _trainer(tiny_system, synthetic_data, "grpo", lora=LoraParams(r=4, alpha=8, dropout=0.0), beta=0.05,
                       policy_lr=1e-2)
    trainable = [n for n, p in trainer.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    metrics = trainer.step()
    assert np.isfinite(metrics[LOSS_KL])
    trainer.save_checkpoint(tmp_path / "last")
    assert (tmp_path / "last/policy/adapter_config.json").is_file()

    loaded = load_policy(tmp_path / "last/policy", prompt_template=TEMPLATE)  # base + adapter, merged
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    batch = encode_prompts(loaded, [image], ["the red circle"])
    trainer.policy.model.eval()
    with torch.no_grad():
        expected = trainer.policy.model(**batch).logits
        assert torch.allclose(loaded.model(**batch).logits, expected, atol=1e-4)
    # The export layout: adapters folded into a plain model.
    save_system(copy.deepcopy(trainer.policy), trainer.tool, tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged/policy/adapter_config.json").exists()
    merged = load_policy(tmp_path / "merged/policy", prompt_template=TEMPLATE)
    with torch.no_grad():
        assert torch.allclose(merged.model(**batch).logits, expected, atol=1e-4)


def test_completions_never_hold_image_tokens(tiny_system, synthetic_data):
    """A policy that likes its image-placeholder token: sampled into a completion, it would make the
    log-prob pass look for image features that are not there (transformers raises). Sampling
    suppresses the multimodal placeholders, and training log-probs use the same distribution."""
    trainer = _trainer(tiny_system, synthetic_data, "grpo", sampling=SamplingParams(group_size=4, temperature=0.7,
                                                                                    max_new_tokens=32))
    policy = trainer.policy
    image_id = policy.model.config.image_token_id
    assert image_id in policy.suppressed_ids
    with torch.no_grad():  # make the image token the model's favourite next token everywhere
        head = policy.model.lm_head.weight
        head[image_id] = head[policy.eos_token_id] * 3 + head.mean(0)
    batch = trainer.rollouts(0)
    assert not (batch.completion_ids == image_id).any()
    with torch.no_grad():
        got = trainer.logprobs(trainer.engine.policy_pass, batch, slice(None))
    assert torch.isfinite(got).all()
    metrics = trainer.step()
    assert all(np.isfinite(v) for v in metrics.values())


def _policy_grads(trainer, batch):
    trainer.policy.model.train()
    trainer.engine.optimizer.zero_grad()
    trainer.accumulate_policy_gradients(batch, torch.linspace(-1.0, 1.0, batch.completion_ids.shape[0]), None, None)
    return {n: p.grad.clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [None, LoraParams(r=4, alpha=8, dropout=0.0)], ids=["full", "lora"])
def test_memory_knobs_leave_the_gradient_as_it_is(tiny_system, synthetic_data, lora):
    """Non-reentrant activation checkpointing and small log-prob chunks change memory, not the math:
    the same rollouts give the same policy gradient (LoRA included: its inputs need a graph)."""
    from grto_cli.core.trainer import MemoryParams

    torch.manual_seed(0)  # LoRA's A matrices start random: both trainers draw the same
    plain = _trainer(tiny_system, synthetic_data, "grpo", lora=lora)
    batch = plain.rollouts(0)
    expected = _policy_grads(plain, batch)
    torch.manual_seed(0)
    lean = _trainer(tiny_system, synthetic_data, "grpo", lora=lora,
                    memory=MemoryParams(gradient_checkpointing=True, logprob_chunk=3))
    model = lean.policy.model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    seen: list[int] = []
    head = lean.policy.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    got = _policy_grads(lean, batch)
    hook.remove()
    assert seen and max(seen) <= 3  # the trainer passes train.logprob_chunk down
    assert expected and set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_full_finetune_freezes_the_vision_tower_unless_told(tiny_system, synthetic_data):
    from grto_cli.core.policy import vision_tower

    frozen = _trainer(tiny_system, synthetic_data, "grpo")
    tower = vision_tower(frozen.policy.model)
    assert not any(p.requires_grad for p in tower.parameters())
    in_opt = {id(p) for g in frozen.engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in tower.parameters())
    assert any(p.requires_grad for p in frozen.policy.model.parameters())  # the language model still trains
    free = _trainer(tiny_system, synthetic_data, "grpo", freeze_vision=False)
    assert all(p.requires_grad for p in vision_tower(free.policy.model).parameters())


def test_full_finetune_of_half_precision_weights_is_refused(tiny_system, synthetic_data):
    """AdamW on bf16 weights: at lr 1e-6 most updates round away. Refused with what to do instead;
    LoRA on the same bf16 model is fine (its adapters train in float32)."""
    policy, tool = load_system(system_paths(tiny_system), TEMPLATE, dtype="bfloat16")
    train, _ = read_manifest(synthetic_data / "train.jsonl")
    with pytest.raises(ValueError, match=r"bfloat16.*policy.dtype: float32.*train.lora"):
        Trainer(RLConfig(method="grpo"), policy, tool, train, [], synthetic_data)
    policy, tool = load_system(system_paths(tiny_system), TEMPLATE, dtype="bfloat16")
    trainer = Trainer(RLConfig(method="grpo", lora=LoraParams(r=4, alpha=8, dropout=0.0)), policy, tool, train, [],
                      synthetic_data)
    assert all(p.dtype == torch.float32 for p in trainer.policy.model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- signs on the path that trains


def _capture_outputs(module):
    """Every output of ``module``'s forward (the trainer's log-prob passes), detached, in order."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    return seen, handle


def _sampling_logprobs(trainer, batch, temperature):
    """Log-probs (N, L) of the batch's completions under the sampler's own distribution: the model
    in eval mode (no dropout), logits / T, the suppressed ids at -inf."""
    model = trainer.policy.model
    was = model.training
    model.eval()
    with torch.no_grad():
        out = completion_logprobs(model, batch.prompts, batch.completion_ids, batch.completion_mask, temperature,
                                  trainer.policy.suppressed_ids, rows=batch.prompt_rows(slice(None)))
    model.train(was)
    return out


def test_the_training_pass_takes_logprobs_at_the_sampling_temperature(tiny_system, synthetic_data):
    """The log-probs the policy loss is built from, captured inside a real step, are the sampler's
    (logits / T), not T = 1's."""
    T = 0.7
    trainer = _trainer(tiny_system, synthetic_data, "grpo",
                       sampling=SamplingParams(group_size=4, temperature=T, max_new_tokens=32))
    batch = trainer.rollouts(0)  # the step below draws the same batch: (seed, step) decide it
    expected, at_one = _sampling_logprobs(trainer, batch, T), _sampling_logprobs(trainer, batch, 1.0)
    assert not torch.allclose(expected, at_one, atol=1e-3)  # the temperature matters for this batch
    seen, handle = _capture_outputs(trainer.engine.policy_pass)
    trainer.step()
    handle.remove()
    got = torch.cat(seen)  # the micro-batches of the one epoch, in order (mu = 1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_with_two_epochs_the_old_logprobs_are_the_samplers_so_the_ratio_moves(tiny_system, synthetic_data,
                                                                            monkeypatch):
    """mu = 2: the old log-probs are computed once, before the first update. The first epoch's
    ratio is then exactly 1, the second's is not (the clip can act). Recomputing them every
    epoch would make every ratio 1 and silently turn the clip off."""
    import grto_cli.core.trainer as trainer_module

    ratios, clip = [], []
    real = trainer_module.policy_loss

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        ratios.append(out.stats[LOSS_RATIO_MEAN])
        clip.append(out.stats["loss/clip_frac"])
        return out

    monkeypatch.setattr(trainer_module, "policy_loss", recording)
    sampling = SamplingParams(group_size=4, temperature=0.7, max_new_tokens=32)
    trainer = _trainer(tiny_system, synthetic_data, "grpo", mu=2, micro_batch=8, policy_lr=1e-2, sampling=sampling)
    trainer.step()
    assert len(ratios) == 2  # one micro-batch per epoch
    assert ratios[0] == pytest.approx(1.0, abs=1e-6) and clip[0] == 0.0
    assert abs(ratios[1] - 1.0) > 1e-3 and clip[1] > 0.0, (ratios, clip)


def test_kl_grows_after_an_update_and_the_full_finetune_reference_stays_the_base(tiny_system, synthetic_data):
    """beta > 0, full fine-tune: KL is 0 at the first step and positive after an update, and the
    reference is still the initial policy (a reference that is the policy itself gives KL 0 forever)."""
    sampling = SamplingParams(group_size=4, temperature=0.7, max_new_tokens=32)
    trainer = _trainer(tiny_system, synthetic_data, "grpo", beta=0.1, policy_lr=1e-2, sampling=sampling)
    initial = _state(trainer.policy.model)
    first, second = trainer.step(), trainer.step()
    assert first[LOSS_KL] == pytest.approx(0.0, abs=1e-6)
    assert second[LOSS_KL] > 1e-4, second[LOSS_KL]
    assert not _same(initial, _state(trainer.policy.model))  # the policy moved
    batch = trainer.rollouts(2)
    base, _ = load_system(system_paths(tiny_system), TEMPLATE)
    with torch.no_grad():
        expected = completion_logprobs(base.model, batch.prompts, batch.completion_ids, batch.completion_mask, 0.7,
                                       base.suppressed_ids, rows=batch.prompt_rows(slice(None)))
    torch.testing.assert_close(trainer.reference_logprobs(batch), expected, atol=1e-5, rtol=1e-4)


def _sequence_logprobs(trainer, batch):
    return _sampling_logprobs(trainer, batch, trainer.cfg.sampling.temperature).sum(1)  # (N,)


def test_one_grpo_step_raises_above_mean_completions_and_lowers_below_mean_ones(tiny_system, synthetic_data):
    """After one real step, the log-probability of the step's own completions moved with their
    advantages: up for the above-mean ones, down for the below-mean ones. A flipped advantage or
    policy-loss sign moves them the other way; a loss detached from the model not at all."""
    from grto_cli.core.grpo import group_advantages

    trainer = _trainer(tiny_system, synthetic_data, "grpo", queries_per_step=4, micro_batch=16, policy_lr=1e-5)
    batch = trainer.rollouts(0)
    advantages, _ = group_advantages(batch.rewards.total, batch.group_size)
    up, down = advantages > 0, advantages < 0
    assert up.sum() >= 2 and down.sum() >= 2, "the batch needs completions above and below their group's mean"
    before = _sequence_logprobs(trainer, batch)
    trainer.step()
    moved = _sequence_logprobs(trainer, batch) - before  # (N,)
    assert moved[up].mean() > 0 > moved[down].mean(), (moved[up].tolist(), moved[down].tolist())
    assert float((advantages * moved).sum()) > 0


def test_the_trainer_gives_groups_below_the_minimum_spread_no_advantage(tiny_system, synthetic_data):
    """``train.min_group_spread`` reaches the advantages the policy update uses, and the share of
    such groups is logged (``rollout/flat_groups``)."""
    from grto_cli.core.metrics import ROLLOUT_FLAT_GROUPS

    from grto_cli.core.rewards import RewardWeights

    # Continuous rewards (no format term), so the groups' spreads differ.
    settings = dict(queries_per_step=4, micro_batch=16, rewards=RewardWeights(format=0.0, box_iou=1.0, point=0.5))
    rewards = _trainer(tiny_system, synthetic_data, "grpo", **settings).rollouts(0).rewards.total.view(4, -1)
    spreads = sorted(set((rewards.amax(1) - rewards.amin(1)).tolist()))  # (B,) -> distinct, ascending
    assert len(spreads) >= 2 and spreads[-1] > 0, spreads
    threshold = (spreads[-2] + spreads[-1]) / 2  # the widest group keeps its advantages
    trainer = _trainer(tiny_system, synthetic_data, "grpo", min_group_spread=threshold, **settings)
    seen = []
    update = trainer.policy_update
    trainer.policy_update = lambda batch, adv: (seen.append((batch, adv.clone())), update(batch, adv))[1]
    metrics = trainer.step()
    batch, advantages = seen[0]
    spread = batch.rewards.total.view(4, -1).amax(1) - batch.rewards.total.view(4, -1).amin(1)  # (B,)
    below = spread < threshold
    assert 0 < int(below.sum()) < 4
    advantages = advantages.view(4, -1)
    assert torch.equal(advantages[below], torch.zeros_like(advantages[below]))
    assert (advantages[~below].abs().amax(1) > 0.5).all()
    assert metrics[ROLLOUT_FLAT_GROUPS] == pytest.approx(float(below.float().mean()))


def test_one_grto_tool_step_lowers_the_tool_loss_on_its_own_calls(tiny_system, synthetic_data):
    """After one real step the tool's loss on the very calls it trained on is lower (a flipped or
    detached tool loss leaves it level or raises it)."""
    trainer = _trainer(tiny_system, synthetic_data, "grto", queries_per_step=4, tool_lr=1e-3)
    batch = trainer.rollouts(0)
    calls = [batch.group_calls(i) for i in range(len(batch.records))]
    with torch.no_grad():
        before, n_valid = tool_loss(trainer.tool, batch.embeddings, calls, batch.targets)
    assert n_valid > 0
    metrics = trainer.step()
    assert metrics[TOOL_LOSS] == pytest.approx(float(before), rel=1e-5)  # the step's loss is this loss
    with torch.no_grad():
        after, _ = tool_loss(trainer.tool, batch.embeddings, calls, batch.targets)
    assert float(after) < float(before) - 1e-3, (float(before), float(after))


# ----------------------------------------------------------------------------- defects found in review


def test_with_lora_dropout_the_training_pass_is_the_samplers_distribution(tiny_system, synthetic_data):
    """LoRA at dropout 0.5: the rollouts are sampled without dropout (eval mode), so the log-probs
    the loss is built from must be too; with dropout on they would be of a distribution nobody
    sampled from."""
    sampling = SamplingParams(group_size=4, temperature=0.7, max_new_tokens=32)
    trainer = _trainer(tiny_system, synthetic_data, "grpo", lora=LoraParams(r=4, alpha=8, dropout=0.5),
                       policy_lr=1e-2, sampling=sampling)
    trainer.step()  # LoRA's B starts at 0 (its dropout then changes nothing): one step moves it
    batch = trainer.rollouts(1)
    expected = _sampling_logprobs(trainer, batch, 0.7)
    seen, handle = _capture_outputs(trainer.engine.policy_pass)
    trainer.step()
    handle.remove()
    torch.testing.assert_close(torch.cat(seen), expected, atol=1e-5, rtol=1e-4)


def test_val_scores_ignore_regions_as_grto_evaluate_does(tiny_system, synthetic_data):
    """ReasonSeg's ignore regions (a record's meta["ignore"]) are left out of val's gIoU exactly as
    `grto evaluate` leaves them out, so the checkpoint is chosen on the number that is reported."""
    from dataclasses import replace

    from grto_cli.core.data.masks import encode_rle
    from grto_cli.core.evaluation import evaluate_split

    trainer = _trainer(tiny_system, synthetic_data, "grpo")
    plain = trainer.val_records
    ignore = np.zeros((plain[0].height, plain[0].width), dtype=bool)
    ignore[:, plain[0].width // 2:] = True  # the right half of every image is "ignore"
    trainer.val_records = [replace(r, dataset="reasonseg", meta={**r.meta, "ignore": encode_rle(ignore)}) for r in plain]
    val = trainer.evaluate_val()
    reported = evaluate_split(trainer.policy, trainer.tool, trainer.val_records, synthetic_data, 50,
                              trainer.cfg.sampling.max_new_tokens)
    assert val[VAL_GIOU] == pytest.approx(reported["giou"])
    trainer.val_records = plain
    assert trainer.evaluate_val()[VAL_GIOU] != pytest.approx(val[VAL_GIOU])  # the ignore region mattered


@pytest.mark.parametrize("where,field,value", [
    ("rl", "mu", 0), ("rl", "micro_batch", 0), ("rl", "queries_per_step", 0),
    ("schedule", "checkpoint_every", 0), ("schedule", "eval_batch_size", 0), ("memory", "logprob_chunk", 0)])
def test_counts_below_one_are_refused_by_name(where, field, value):
    """mu 0 left grad_norm unset; checkpoint_every 0 divided by zero. Refused, naming the key."""
    from grto_cli.core.trainer import MemoryParams

    cfg = {"rl": RLConfig, "schedule": Schedule, "memory": MemoryParams}[where](**{field: value})
    with pytest.raises(ValueError, match=f"{field} must be at least 1, got {value}"):
        cfg.validate()


def test_rollouts_run_lora_adapters_in_the_models_bf16_and_train_them_in_float32(tiny_system, synthetic_data):
    """A bf16 policy with float32 LoRA adapters (the real templates'): generation runs the adapters
    in bf16 (no up-cast per projection per token), the training pass in float32, and the float32
    masters come back bit for bit. The sampler's log-probs (bf16 adapters) and the training pass's
    (float32 adapters) agree to bf16 precision."""
    from grto_cli.core.policy import adapters_in_compute_dtype, completion_mask, expand_prompts, sampling_config
    from grto_cli.core.sampling import GumbelSampler, row_keys
    from transformers import LogitsProcessorList

    policy, tool = load_system(system_paths(tiny_system), TEMPLATE, dtype="bfloat16")
    train, _ = read_manifest(synthetic_data / "train.jsonl")
    trainer = Trainer(RLConfig(method="grpo", queries_per_step=2, lora=LoraParams(r=4, alpha=8, dropout=0.0),
                               sampling=SamplingParams(group_size=2, temperature=0.7, max_new_tokens=12)),
                      policy, tool, train, [], synthetic_data)
    model = trainer.policy.model
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():  # LoRA's B starts at 0: give the adapters a say in the logits
        for n, p in adapters:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    masters = {n: (p, p.detach().clone()) for n, p in adapters}
    assert all(p.dtype == torch.float32 for _, p in adapters)
    seen: list[torch.dtype] = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    hook = lora_a.register_forward_pre_hook(lambda mod, args: seen.append((mod.weight.dtype, args[0].dtype)))
    batch = trainer.rollouts(0)  # sample_completions -> policy.generate, the trainer's own path
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)
    seen.clear()
    with torch.no_grad():
        trainer.logprobs(trainer.engine.policy_pass, batch, slice(0, 2))  # the training pass
    assert seen and set(seen) == {(torch.float32, torch.float32)}, set(seen)
    hook.remove()
    for n, (p, before) in masters.items():  # the same parameters, the same float32 bits
        assert dict(model.named_parameters())[n] is p and p.dtype == torch.float32 and torch.equal(p, before), n

    # The scores the sampler drew from (bf16 adapters), against the training pass (float32 adapters).
    prompts = batch.prompts
    keys = row_keys([0, 1], 2)
    cfg = sampling_config(trainer.policy, 12)
    cfg.output_scores, cfg.return_dict_in_generate = True, True
    sampler = GumbelSampler(keys, 0.7, prompts["input_ids"].shape[1])
    rows = torch.arange(2).repeat_interleave(2)
    model.eval()
    with torch.no_grad(), adapters_in_compute_dtype(model) as cast:
        out = model.generate(**expand_prompts(model, prompts, rows), generation_config=cfg,
                             logits_processor=LogitsProcessorList([sampler]))
    assert cast == len(adapters)
    completion = out.sequences[:, prompts["input_ids"].shape[1]:]
    mask = completion_mask(completion, trainer.policy.eos_token_id)
    drawn = torch.stack([torch.log_softmax(s.float() - sampler.noise(t, s.shape[-1], s.device), -1)
                         for t, s in enumerate(out.scores)], 1).gather(-1, completion[..., None]).squeeze(-1) * mask
    with torch.no_grad():
        trained = completion_logprobs(model, prompts, completion, mask, 0.7, trainer.policy.suppressed_ids, rows=rows)
    diff = (trained - drawn).abs()[mask.bool()]
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())  # bf16: 8 bits of mantissa
