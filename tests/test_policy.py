import numpy as np
import pytest
import torch
from PIL import Image

from grto_cli.core.answer import format_answer, parse_answer
from grto_cli.core.policy import (completion_logprobs, completion_mask, encode_prompts, expand_prompts, generate,
                                  load_policy, prompt_text, resized_sizes, sampling_config, select_prompts)
from grto_cli.core.sampling import GumbelSampler, row_keys
from transformers import LogitsProcessorList


def test_completion_mask_stops_after_first_eos_even_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2],   # pad == eos: the first EOS counts, the rest do not
                        [5, 2, 7, 8, 9],   # garbage after EOS is masked
                        [5, 6, 7, 8, 9]])  # no EOS: everything counts
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def sample_with_scores(policy, batch: dict, temperature: float, max_new_tokens: int = 10):
    """Sample completions of ``batch`` (row keys 0..B-1) and recover the scores the sampler drew
    from: the processed scores ``generate`` returns less the sampler's Gumbel noise, i.e. the
    logits after every other processor (suppressed tokens) and the temperature. Returns
    (completion, mask, their log-softmax (B, L, V), its value at each sampled token (B, L), masked)."""
    cfg = sampling_config(policy, max_new_tokens)
    cfg.output_scores, cfg.return_dict_in_generate = True, True
    sampler = GumbelSampler(row_keys(range(batch["input_ids"].shape[0]), 1), temperature, batch["input_ids"].shape[1])
    out = policy.model.generate(**batch, generation_config=cfg, logits_processor=LogitsProcessorList([sampler]))
    completion = out.sequences[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(completion, policy.eos_token_id)
    scores = [s.float() - sampler.noise(t, s.shape[-1], s.device) for t, s in enumerate(out.scores)]
    sampled = torch.stack([torch.log_softmax(s, -1) for s in scores], 1)
    return completion, mask, sampled, sampled.gather(-1, completion[..., None]).squeeze(-1) * mask


@pytest.mark.parametrize("favour_image_token", [False, True])
def test_recomputed_logprobs_match_sampling_logits(tiny_system, favour_image_token):
    """Left-padded prompts of different lengths, repeated per rollout, temperature != 1: the
    training-time log-probs must equal the log-softmax of the scores the sampler used. With a
    model that favours its (suppressed) image token, leaving suppression out of training shows."""
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    if favour_image_token:
        with torch.no_grad():
            head = policy.model.lm_head.weight
            head[policy.model.config.image_token_id] = head[policy.eos_token_id] * 3 + head.mean(0)
    batch = encode_prompts(policy, _images(2), ["the red circle", "the shape left of the blue square"])
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    batch = repeat_prompts(batch, 3)
    temperature = 0.7
    completion, mask, sampled, expected = sample_with_scores(policy, batch, temperature)
    assert policy.suppressed_ids and torch.isinf(sampled[..., list(policy.suppressed_ids)]).all()
    with torch.no_grad():
        got = completion_logprobs(policy.model, batch, completion, mask, temperature, policy.suppressed_ids)
    assert torch.allclose(got, expected, atol=1e-4)
    # At another temperature the numbers differ: the test would catch a missing `/ T`.
    with torch.no_grad():
        wrong = completion_logprobs(policy.model, batch, completion, mask, 1.0, policy.suppressed_ids)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def repeat_prompts(batch: dict, n: int) -> dict:
    """Every prompt ``n`` times in a row, pixels included: the naive input for n rollouts each, which
    ``expand_prompts`` must equal without encoding each image n times."""
    return select_prompts(batch, [i for i in range(batch["input_ids"].shape[0]) for _ in range(n)])


def test_select_prompts_picks_whole_image_patch_blocks(tiny_system):
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    batch = encode_prompts(policy, _images(2), ["a", "b"])
    rep = select_prompts(batch, [0, 0, 1, 0])
    n = batch["pixel_values"].shape[0] // 2
    first, second = batch["pixel_values"][:n], batch["pixel_values"][n:]
    assert torch.equal(rep["pixel_values"], torch.cat([first, first, second, first]))
    assert torch.equal(rep["input_ids"][2], batch["input_ids"][1])


def test_each_prompt_image_goes_through_the_vision_tower_once(tiny_system):
    """G completions per prompt: generation and log-probs share one vision-tower output per image
    (a hook counts the patches the tower sees) and give what G encoded copies give."""
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    prompts = encode_prompts(policy, _images(2), ["the red circle", "the shape left of the blue square"])
    G, patches_per_image = 3, prompts["pixel_values"].shape[0] // 2
    rows = torch.arange(2).repeat_interleave(G)
    seen: list[int] = []
    hook = policy.model.model.visual.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        sampler = GumbelSampler(row_keys([1, 2], G), 1.0, prompts["input_ids"].shape[1])
        with torch.no_grad():
            shared, _ = generate(policy, expand_prompts(policy.model, prompts, rows), sampling_config(policy, 12), sampler)
        assert seen == [2 * patches_per_image]
        copies, _ = generate(policy, repeat_prompts(prompts, G), sampling_config(policy, 12), sampler)
        assert seen[1:] == [2 * G * patches_per_image]  # the naive input encodes every copy
        assert torch.equal(shared, copies)
        mask = completion_mask(shared, policy.eos_token_id)
        seen.clear()
        with torch.no_grad():
            grouped = completion_logprobs(policy.model, prompts, shared, mask, 0.7, policy.suppressed_ids, rows=rows)
            # Rows 2..4 of the group layout: the end of prompt 0's group and the start of prompt 1's.
            partial = completion_logprobs(policy.model, prompts, shared[2:5], mask[2:5], 0.7, policy.suppressed_ids,
                                          rows=rows[2:5])
        assert seen == [2 * patches_per_image, 2 * patches_per_image]
        with torch.no_grad():
            naive = completion_logprobs(policy.model, repeat_prompts(prompts, G), shared, mask, 0.7,
                                        policy.suppressed_ids)
    finally:
        hook.remove()
    assert torch.allclose(grouped, naive, atol=1e-5)
    assert torch.allclose(partial, naive[2:5], atol=1e-5)


def test_checkpoint_generation_defaults_cannot_change_sampling(tiny_system):
    """Qwen2.5-VL-7B-Instruct ships top_k=1 and repetition_penalty 1.05 in its generation_config:
    with them in the checkpoint's config, sampling must draw the very same completions."""
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    batch = repeat_prompts(encode_prompts(policy, _images(2), ["the red circle", "the blue square"]), 4)
    sampler = GumbelSampler(row_keys([3, 4], 4), 1.0, batch["input_ids"].shape[1])
    plain, _ = generate(policy, batch, sampling_config(policy, 12), sampler)
    assert len({tuple(row) for row in plain.tolist()}) > 1  # really sampled, not one greedy answer
    policy.model.generation_config.top_k = 1
    policy.model.generation_config.repetition_penalty = 1.05
    policy.model.generation_config.do_sample = True
    policy.model.generation_config.temperature = 0.1
    again, _ = generate(policy, batch, sampling_config(policy, 12), sampler)
    assert torch.equal(plain, again)


def test_resized_sizes_are_what_the_processor_made_of_a_non_square_image(tiny_system):
    """100x250 image, pixel budget 64x64: the processor scales height and width by different
    factors, and resized_sizes must report (height, width) in that order."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    ip = policy.processor.image_processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 250, 3), dtype=np.uint8))
    batch = encode_prompts(policy, [image], ["the red circle"])
    # transformers keeps the pixel budget as size = {shortest_edge: min_pixels, longest_edge: max_pixels}
    expected = smart_resize(100, 250, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
    (rh, rw), = resized_sizes(policy, batch)
    assert (rh, rw) == tuple(expected)
    assert rh / 100 != rw / 250  # each axis really has its own scale
    # A box in original pixels survives the family's convention both ways (to 1 resized pixel).
    box, point = (20.0, 10.0, 200.0, 90.0), (110.0, 50.0)
    parsed = parse_answer(format_answer(box, point, (100, 250), (rh, rw), "absolute"), (100, 250), (rh, rw))
    assert parsed.call.box == pytest.approx(box, abs=max(100 / rh, 250 / rw))
    assert parsed.call.points[0] == pytest.approx(point, abs=max(100 / rh, 250 / rw))


def test_a_right_padded_checkpoint_is_loaded_left_padded(tiny_system, tmp_path):
    """Real Qwen checkpoints save padding_side "right"; generation and batched log-probs need left."""
    import json
    import shutil

    from transformers import AutoProcessor

    shutil.copytree(tiny_system / "policy", tmp_path / "policy")
    config = tmp_path / "policy/tokenizer_config.json"
    data = json.loads(config.read_text())
    data["padding_side"] = "right"
    config.write_text(json.dumps(data))
    assert AutoProcessor.from_pretrained(str(tmp_path / "policy")).tokenizer.padding_side == "right"
    policy = load_policy(tmp_path / "policy", prompt_template="Locate: {query}.")
    batch = encode_prompts(policy, _images(2), ["a", "the shape left of the blue square"])
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and (mask[:, 0] == 0).any()  # padding on the left only


def test_logprobs_never_build_logits_longer_than_a_completion_chunk(tiny_system):
    """The LM head only ever sees completion positions, ``chunk`` at a time (a hook on it records
    every logits tensor), and the chunked log-probs and their gradients equal one whole pass."""
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    model = policy.model
    batch = repeat_prompts(encode_prompts(policy, _images(2), ["the red circle", "the blue square"]), 2)
    sampler = GumbelSampler(row_keys([0, 1], 2), 1.0, batch["input_ids"].shape[1])
    completion, _ = generate(policy, batch, sampling_config(policy, 12), sampler)
    mask = completion_mask(completion, policy.eos_token_id)
    shapes: list[tuple] = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    try:
        chunked = completion_logprobs(model, batch, completion, mask, 0.7, policy.suppressed_ids, chunk=5)
        chunked.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        shapes_chunked = list(shapes)
        whole = completion_logprobs(model, batch, completion, mask, 0.7, policy.suppressed_ids, chunk=10 ** 6)
        whole.sum().backward()
    finally:
        hook.remove()
    L, V = completion.shape[1], model.lm_head.out_features
    # forward chunks of <= 5 tokens (recomputed once more each in the backward), never the prompt
    assert shapes_chunked and all(s[1] <= 5 and s[-1] == V for s in shapes_chunked)
    assert sum(s[1] for s in shapes_chunked) == 2 * L
    assert max(s[1] for s in shapes) == L  # the whole pass: the completion's L positions, not P + L
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)
    assert "lm_head.weight" in grads or any("embed_tokens" in n for n in grads)  # the head got a gradient


def test_max_pixels_bounds_the_visual_tokens_and_travels_with_the_saved_system(tiny_system, tmp_path):
    """The tiny processor sees 64x64 images as 16 visual tokens (16x16 pixels each); max_pixels 1024
    allows 4. A system saved from that policy (and its export bundle) resizes the same way."""
    from grto_cli.core.checkpoint import load_system, save_system, system_paths
    from grto_cli.core.export import read_bundle, write_bundle
    from grto_cli.core.policy import pixel_limits

    def visual_tokens(policy) -> int:
        batch = encode_prompts(policy, _images(1), ["the red circle"])
        return int((batch["input_ids"] == policy.model.config.image_token_id).sum())

    assert visual_tokens(load_policy(tiny_system / "policy")) == 16
    bounded = load_policy(tiny_system / "policy", min_pixels=256, max_pixels=1024)
    assert visual_tokens(bounded) == 4 and pixel_limits(bounded.processor) == {"min_pixels": 256, "max_pixels": 1024}
    policy, tool = load_system(system_paths(tiny_system), "Locate: {query}.", max_pixels=1024, min_pixels=256)
    save_system(policy, tool, tmp_path / "system")
    assert visual_tokens(load_policy(tmp_path / "system" / "policy")) == 4
    write_bundle(policy, tool, tmp_path / "bundle", {"require_think": False, "max_new_tokens": 8}, {})
    again, _, spec = read_bundle(tmp_path / "bundle")
    assert visual_tokens(again) == 4 and spec["policy"]["max_pixels"] == 1024


def test_an_unknown_family_asks_for_coord_convention():
    from grto_cli.core.policy import FAMILY_CONVENTIONS, family_convention

    assert family_convention("qwen2_5_vl") == "absolute"
    assert family_convention("qwen2_vl") == family_convention("qwen3_vl") == "relative1000"
    with pytest.raises(ValueError, match=r"'llava'.*policy.coord_convention.*absolute.*relative1000"):
        family_convention("llava")
    assert family_convention("llava", "relative1000") == "relative1000"
    assert set(FAMILY_CONVENTIONS) >= {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


@pytest.mark.parametrize("template, image_first", [("Locate: {query}.", True), ("Locate: {query}.{image}", False)])
def test_the_template_places_the_image(tiny_system, template, image_first):
    """Without ``{image}`` the image opens the user turn (Qwen's own layout); with it, the image goes
    where the slot is: here after the query, so the visual tokens can attend to the query's words."""
    policy = load_policy(tiny_system / "policy", prompt_template=template)
    text = prompt_text(policy, "the red circle")
    image, query = text.index("<|image_pad|>"), text.index("the red circle")
    assert (image < query) == image_first
    assert text.count("<|vision_start|>") == 1 and text.endswith("<|im_start|>assistant\n")
    ids = encode_prompts(policy, [Image.new("RGB", (64, 64))], ["the red circle"])["input_ids"][0].tolist()
    pad = policy.model.config.image_token_id
    first_pad = ids.index(pad)
    red = policy.tokenizer.encode(" red")[0]
    assert (first_pad < ids.index(red)) == image_first


def test_a_template_without_one_query_slot_is_refused():
    from grto_cli.stages.params import ConfigError
    from grto_cli.stages.sections import PolicyParams

    for bad in ("Locate the shape.", "{query} {query}", "{image} {query} {image}"):
        with pytest.raises(ConfigError, match="prompt_template"):
            PolicyParams(prompt_template=bad).validate()
    PolicyParams(prompt_template="{image} Where is {query}?").validate()
