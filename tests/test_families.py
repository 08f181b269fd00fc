"""Every supported policy family, checked on a tiny random model of its real class.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE are each built from configs (no download), with
their real processor class, saved with ``save_pretrained`` and loaded back through
``load_policy``, the loader the pipelines use. For each family: the training-time log-probs equal
the sampler's, and a box in original pixels survives the family's coordinate convention on a
non-square image the processor really resizes (a different scale per axis).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from grto_cli.core.answer import ANSWER_RE, format_answer, parse_answer
from grto_cli.core.policy import FAMILY_CONVENTIONS, completion_logprobs, encode_prompts, load_policy, resized_sizes
from grto_cli.core.tiny import CHAT_TEMPLATE, build_tiny_tokenizer
from test_policy import repeat_prompts, sample_with_scores

PATCH = 8  # vision patch; with merge_size 2 the processor resizes to multiples of 16 pixels
HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
MROPE = [2, 3, 3]  # sums to HEAD_DIM / 2
VISION = 32
# Each image is resized to at most 64x64 pixels (16 visual tokens), at least 32x32.
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str
    config_class: str
    processor_class: str
    video_processor_class: str
    tied: bool  # LM head tied to the input embeddings, as in the family's small real checkpoints


FAMILIES = [
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor",
           "Qwen2VLVideoProcessor", tied=True),  # Qwen2-VL-2B
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor",
           "Qwen2VLVideoProcessor", tied=False),  # Qwen2.5-VL-7B (the embedded default is untied too)
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor",
           "Qwen3VLVideoProcessor", tied=True),  # Qwen3-VL-2B/4B
    Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", "Qwen3VLProcessor",
           "Qwen3VLVideoProcessor", tied=False),  # Qwen3-VL-30B-A3B
]


def _class(name: str):
    """A transformers class, or a skip when the installed transformers has none by that name."""
    transformers = importlib.import_module("transformers")
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _text_config(family: Family, ids: dict[str, int], vocab: int) -> dict:
    text = {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 1024, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10.0, "mrope_section": MROPE}}
    if family.model_type.startswith("qwen3_vl"):
        if family.model_type == "qwen3_vl":  # its text config takes no bos/eos ids
            del text["bos_token_id"], text["eos_token_id"]
        text["head_dim"] = HEAD_DIM
        text["rope_parameters"]["mrope_interleaved"] = True
    if family.model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[])
    return text


def _vision_config(family: Family) -> dict:
    common = {"depth": 2, "num_heads": 2, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family.model_type == "qwen2_vl":
        return dict(common, embed_dim=VISION, hidden_size=HIDDEN, mlp_ratio=2)
    if family.model_type == "qwen2_5_vl":
        return dict(common, hidden_size=VISION, intermediate_size=2 * VISION, out_hidden_size=HIDDEN,
                    window_size=64, fullatt_block_indexes=[1])
    # Qwen3-VL: a learned 4x4 position grid (interpolated to each image's patch grid) and one
    # deepstack layer, whose features are added to the language model's first layer.
    return dict(common, hidden_size=VISION, intermediate_size=2 * VISION, out_hidden_size=HIDDEN,
                num_position_embeddings=16, deepstack_visual_indexes=[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops on these models are tiny: one intra-op thread. Two threads on two busy cores made
    generation ~100x slower here (3 s instead of 0.02 s a call), so this module uses one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(600)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer) -> Callable[[Family], Path]:
    """family -> a save_pretrained directory (model + processor), built on first use, once per module."""
    built: dict[str, Path] = {}

    def build(family: Family) -> Path:
        if family.model_type in built:
            return built[family.model_type]
        model_cls, config_cls = _class(family.model_class), _class(family.config_class)
        processor_cls = _class(family.processor_class)
        from transformers import Qwen2VLImageProcessor

        # The checkpoint's own budget is larger than the tests': only load_policy's bounds make a
        # 90x200 image 32x80 (saved ones would make it 80x176).
        image_processor = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                                min_pixels=64 * 64, max_pixels=128 * 128)
        video_cls = getattr(importlib.import_module("transformers"), family.video_processor_class, None)
        video_processor = (video_cls(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
                           if video_cls is not None else None)
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, chat_template=CHAT_TEMPLATE)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
        config = config_cls(text_config=_text_config(family, ids, len(tokenizer)), vision_config=_vision_config(family),
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=family.tied)
        torch.manual_seed(0)
        model = model_cls(config)
        model.generation_config.eos_token_id = ids["<|im_end|>"]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        out = tmp_path_factory.mktemp(family.model_type)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        built[family.model_type] = out
        return out

    return build


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("favour_image_token", [False, True])
@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_recomputed_logprobs_match_sampling_logits(family_dirs, family, favour_image_token):
    """As tests/test_policy.py's test of the same name, for each family: left-padded prompts of
    different lengths (and images of different sizes), repeated per rollout, temperature != 1."""
    policy = load_policy(family_dirs(family), prompt_template="Locate: {query}.", min_pixels=MIN_PIXELS,
                         max_pixels=MAX_PIXELS)
    assert type(policy.model).__name__ == family.model_class
    assert type(policy.processor).__name__ == family.processor_class
    assert type(policy.processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(policy.processor.video_processor).__name__ == family.video_processor_class
    head, embed = policy.model.get_output_embeddings().weight, policy.model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == family.tied  # tying survives save + load
    image_token = policy.model.config.image_token_id
    assert image_token in policy.suppressed_ids and len(policy.suppressed_ids) == 4
    batch = encode_prompts(policy, [_image(64, 64, 0), _image(90, 200, 1)],
                           ["the red circle", "the shape left of the blue square"])
    with torch.no_grad():
        # EOS along the mean final hidden state: some rollouts end early, so the completions hold
        # post-EOS padding (masked) as real ones do.
        direction = policy.model.model(**batch).last_hidden_state.flatten(0, 1).mean(0)
        head[policy.eos_token_id] += 1.25 * direction / direction.norm()
        if favour_image_token:
            head[image_token] = head[policy.eos_token_id] * 3 + head.mean(0)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    assert sizes[0] != sizes[1]  # pixel_values blocks of different lengths: repeat_prompts must keep them whole
    single = batch
    batch = repeat_prompts(single, 3)
    temperature = 0.7
    completion, mask, sampled, expected = sample_with_scores(policy, batch, temperature)
    assert (mask == 0).any(), "no rollout ended early: the post-EOS path goes unchecked"
    assert torch.isinf(sampled[..., list(policy.suppressed_ids)]).all()
    assert not torch.isin(completion, torch.tensor(policy.suppressed_ids)).any()
    with torch.no_grad():
        got = completion_logprobs(policy.model, batch, completion, mask, temperature, policy.suppressed_ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # Each repeated row is its own prompt, image included: the first rollout of each prompt scores
    # the same against the batch before repetition.
    with torch.no_grad():
        alone = completion_logprobs(policy.model, single, completion[::3], mask[::3], temperature,
                                    policy.suppressed_ids)
    assert torch.allclose(alone, got[::3], atol=1e-4), (alone - got[::3]).abs().max()
    # The trainer's layout: one prompt per group, its image encoded once and shared by 3 rows
    # (Qwen3-VL's deepstack features included).
    with torch.no_grad():
        grouped = completion_logprobs(policy.model, single, completion, mask, temperature, policy.suppressed_ids,
                                      rows=torch.arange(2).repeat_interleave(3))
    assert torch.allclose(grouped, got, atol=1e-4), (grouped - got).abs().max()
    with torch.no_grad():
        wrong = completion_logprobs(policy.model, batch, completion, mask, 1.0, policy.suppressed_ids)
    assert not torch.allclose(wrong, expected, atol=1e-3)
    if favour_image_token:  # the image token carries real mass: leaving suppression out of training shows
        with torch.no_grad():
            unsuppressed = completion_logprobs(policy.model, batch, completion, mask, temperature, ())
        assert not torch.allclose(unsuppressed, expected, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_a_box_round_trips_through_the_familys_convention(family_dirs, family):
    """A 90x200 image resized under a 64x64-pixel budget gets a different scale per axis; a box and
    a point in original pixels, written in the family's convention and parsed back, come back to
    within the convention's rounding."""
    policy = load_policy(family_dirs(family), prompt_template="Locate: {query}.", min_pixels=MIN_PIXELS,
                         max_pixels=MAX_PIXELS)
    convention = FAMILY_CONVENTIONS[family.model_type]
    assert policy.coord_convention == convention
    assert convention == ("absolute" if family.model_type == "qwen2_5_vl" else "relative1000")
    (H, W) = (90, 200)
    batch = encode_prompts(policy, [_image(H, W, 0)], ["the red circle"])
    (rh, rw), = resized_sizes(policy, batch)
    ip = policy.processor.image_processor
    expected = smart_resize(H, W, factor=ip.patch_size * ip.merge_size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert (rh, rw) == tuple(expected) == (32, 80)  # (height, width), under load_policy's budget
    assert rh / H != pytest.approx(rw / W, rel=0.02)  # each axis really has its own scale
    visual_tokens = int((batch["input_ids"] == policy.model.config.image_token_id).sum())
    assert visual_tokens == (rh // (2 * PATCH)) * (rw // (2 * PATCH))  # the size the encoder saw
    box, point = (20.0, 10.0, 170.0, 80.0), (110.0, 50.0)
    text = format_answer(box, point, (H, W), (rh, rw), policy.coord_convention)
    parsed = parse_answer(text, (H, W), (rh, rw), policy.coord_convention)
    assert parsed.format_ok, parsed.status
    # Rounding to one unit of the convention, in original pixels per axis.
    if convention == "absolute":
        ux, uy = W / rw, H / rh
    else:
        ux, uy = W / 1000, H / 1000
    (x1, y1, x2, y2), (px, py) = parsed.call.box, parsed.call.points[0]
    for got, want, unit in ((x1, box[0], ux), (y1, box[1], uy), (x2, box[2], ux), (y2, box[3], uy),
                            (px, point[0], ux), (py, point[1], uy)):
        assert abs(got - want) <= unit / 2 + 1e-9
    # The written numbers are the convention's: absolute ones fit the resized image, relative ones 0..1000.
    answer = json.loads(ANSWER_RE.search(text).group(1))
    written = answer["bbox"] + answer["points"][0]
    xs, ys = written[0::2], written[1::2]
    assert all(0 <= v <= (rw if convention == "absolute" else 1000) for v in xs)
    assert all(0 <= v <= (rh if convention == "absolute" else 1000) for v in ys)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_a_static_kv_cache_generates_what_the_dynamic_one_does(family_dirs, family):
    """``policy.generation_cache: static`` (preallocated; compiled decoding on CUDA) is a speed knob:
    for each family the same sampled completions as transformers' dynamic cache, from left-padded
    prompts of different lengths and images of different sizes, G rows per prompt."""
    from grto_cli.core.policy import expand_prompts, generate, sampling_config
    from grto_cli.core.sampling import GumbelSampler, row_keys

    policy = load_policy(family_dirs(family), prompt_template="Locate: {query}.", min_pixels=MIN_PIXELS,
                         max_pixels=MAX_PIXELS)
    prompts = encode_prompts(policy, [_image(64, 64, 0), _image(90, 200, 1)],
                             ["the red circle", "the shape left of the blue square"])
    rows = torch.arange(2).repeat_interleave(3)
    completions = {}
    for cache in ("dynamic", "static"):
        policy.generation_cache = cache
        config = sampling_config(policy, 12)
        assert config.cache_implementation == (None if cache == "dynamic" else "static")
        with torch.no_grad():
            inputs = expand_prompts(policy.model, prompts, rows)
        sampler = GumbelSampler(row_keys([5, 6], 3), 1.0, prompts["input_ids"].shape[1])
        completions[cache], _ = generate(policy, inputs, config, sampler)
    assert len({tuple(r) for r in completions["dynamic"].tolist()}) > 1  # really sampled
    assert torch.equal(completions["static"], completions["dynamic"])


def test_the_policy_section_chooses_the_generation_cache(tiny_system):
    from grto_cli.core.checkpoint import system_paths
    from grto_cli.stages.params import ConfigError, Params
    from grto_cli.stages.sections import PolicyParams, ToolParams
    from grto_cli.stages.system import load_stage_system

    pol = PolicyParams(prompt_template="Locate: {query}.", device="cpu", generation_cache="static")
    policy, _ = load_stage_system(system_paths(tiny_system), pol, ToolParams())
    assert policy.generation_cache == "static"
    with pytest.raises((ConfigError, ValueError), match="generation_cache"):
        Params(None, ["policy.generation_cache=paged"]).section(PolicyParams, "policy")
