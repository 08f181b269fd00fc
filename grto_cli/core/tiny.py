"""Tiny base models for the embedded default and tests.

The tiny VLM is a real Hugging Face VLM class at a few M parameters, one builder per family in a
closed registry (``TINY_FAMILIES``): ``Qwen3VLForConditionalGeneration`` (the embedded default) or
``Qwen2_5_VLForConditionalGeneration`` (the real pipelines' family, which the tests' fixture system
uses), each with a byte-level BPE tokenizer trained offline and the family's real processor. The
tiny SAM is segment-anything's own ``Sam`` at small dims. Both are saved in the formats of the real
checkpoints and loaded back by the same loaders (``policy.load_policy``, ``tool.load_sam``).

Why Qwen3-VL for the embedded default: its vision tower adds a learned absolute position to every
patch; Qwen2.5-VL's has none (position enters only through RoPE's rotations of attention scores,
never the features attention copies), so a tiny one trained from scratch for minutes barely learns
*where* a patch is, and on a plain background answered one box for everything (README, "what the
warm-up needed").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor)

from grto_cli.core.data.synthetic import COLORS, KINDS, RELATIONS
from grto_cli.core.tool import SamArch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat layout (no default system turn, to keep tiny prompts short).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyVLMArch:
    family: str = "qwen3_vl"  # a key of TINY_FAMILIES
    image_size: int = 64
    patch_size: int = 8
    vocab_size: int = 1200
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 96
    vision_depth: int = 2
    vision_heads: int = 4
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    # M-RoPE gives the width axis the lowest frequencies; at theta 10000 and head_dim 32 a 4-column
    # image grid turns by < 0.01 rad per column, so attention cannot tell columns apart. A small
    # theta keeps every axis's frequencies in a range the short tiny sequences can use.
    rope_theta: float = 10.0
    # Std of the language model's initial weights. transformers' 0.02 suits hidden sizes in the
    # thousands; at 128 it leaves attention near-uniform for long, and the warm-up never learned to
    # pick the shape a query names (README). ~1/sqrt(hidden_size) is the usual choice at this size.
    initializer_range: float = 0.02
    vision_initializer_range: float = 0.02
    deepstack: list[int] = field(default_factory=list)  # Qwen3-VL: vision layers fed to the LM's first layers


def tokenizer_corpus(max_coordinate: int = 1000) -> list[str]:
    """Text the tiny tokenizer is trained on: queries, prompts, answers and every coordinate."""
    words = list(COLORS) + list(KINDS) + list(RELATIONS) + [
        "the", "shape", "only", "largest", "smallest", "that", "is", "not", "Locate", "Find", "user",
        "assistant", "system", "bbox", "points", "answer", "think"]
    lines = [" ".join(words)] * 20
    for i in range(max_coordinate + 1):
        lines.append(f'<think>find it</think><answer>{{"bbox": [{i}, {i}, {i}, {i}], "points": [[{i}, {i}]]}}</answer>')
    for c in COLORS:
        for k in KINDS:
            lines.append(f"Locate: the {c} {k}. the only {k}, the largest {c} shape, the shape that is not {c}")
            for words_ in RELATIONS:
                lines.append(f"Locate: the shape {words_} the {c} {k}.")
    return lines


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Byte-level, like Qwen's own tokenizer: any text round-trips exactly through decode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    # Saved right-padded, as Qwen's checkpoints are: ``load_policy`` must switch it to left padding.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _image_processor(arch: TinyVLMArch) -> Qwen2VLImageProcessor:
    pixels = arch.image_size * arch.image_size  # every image becomes image_size x image_size
    return Qwen2VLImageProcessor(patch_size=arch.patch_size, merge_size=2, temporal_patch_size=2,
                                 min_pixels=pixels, max_pixels=pixels)


def _video_processor(name: str, arch: TinyVLMArch):
    import transformers

    cls = getattr(transformers, name, None)  # older transformers have no separate video processor
    return cls(patch_size=arch.patch_size, merge_size=2, temporal_patch_size=2) if cls is not None else None


def _text_config(arch: TinyVLMArch, tokenizer, **extra) -> dict:
    ids = _special_ids(tokenizer)
    return dict(vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                num_key_value_heads=arch.num_kv_heads, max_position_embeddings=2048,
                initializer_range=arch.initializer_range, pad_token_id=ids["<|endoftext|>"], **extra)


def _token_ids(tokenizer) -> dict[str, int]:
    ids = _special_ids(tokenizer)
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen2_5_vl(arch: TinyVLMArch, tokenizer):
    ids = _special_ids(tokenizer)
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": arch.mrope_section}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(arch, tokenizer, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                 rope_parameters=rope),
        vision_config=dict(
            depth=arch.vision_depth, hidden_size=arch.vision_hidden_size, intermediate_size=2 * arch.vision_hidden_size,
            num_heads=arch.vision_heads, patch_size=arch.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            window_size=arch.image_size, out_hidden_size=arch.hidden_size,
            initializer_range=arch.vision_initializer_range, fullatt_block_indexes=list(range(arch.vision_depth))),
        **_token_ids(tokenizer))
    config.text_config.pad_token_id = ids["<|endoftext|>"]
    processor = Qwen2_5_VLProcessor(image_processor=_image_processor(arch), tokenizer=tokenizer,
                                    video_processor=_video_processor("Qwen2VLVideoProcessor", arch),
                                    chat_template=CHAT_TEMPLATE)
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _qwen3_vl(arch: TinyVLMArch, tokenizer):
    # Qwen3-VL's M-RoPE interleaves the (t, h, w) frequencies; its vision tower learns one position
    # embedding per cell of a grid (here one per patch of the fixed-size image).
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": arch.mrope_section,
            "mrope_interleaved": True}
    grid = arch.image_size // arch.patch_size
    config = Qwen3VLConfig(
        text_config=_text_config(arch, tokenizer, head_dim=arch.hidden_size // arch.num_heads, rope_parameters=rope),
        vision_config=dict(
            depth=arch.vision_depth, hidden_size=arch.vision_hidden_size, intermediate_size=2 * arch.vision_hidden_size,
            num_heads=arch.vision_heads, patch_size=arch.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=arch.hidden_size, num_position_embeddings=grid * grid,
            deepstack_visual_indexes=list(arch.deepstack), initializer_range=arch.vision_initializer_range),
        tie_word_embeddings=False, **_token_ids(tokenizer))
    processor = Qwen3VLProcessor(image_processor=_image_processor(arch), tokenizer=tokenizer,
                                 video_processor=_video_processor("Qwen3VLVideoProcessor", arch),
                                 chat_template=CHAT_TEMPLATE)
    return Qwen3VLForConditionalGeneration, config, processor


# The families a tiny policy can be built in: arch -> (model class, config, processor).
TINY_FAMILIES = {"qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl}


def build_tiny_vlm(arch: TinyVLMArch, seed: int = 0):
    """An untrained tiny VLM of ``arch.family`` and its processor."""
    if arch.family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny VLM family {arch.family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    tokenizer = build_tiny_tokenizer(arch.vocab_size)
    model_cls, config, processor = TINY_FAMILIES[arch.family](arch, tokenizer)
    ids = _special_ids(tokenizer)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def tiny_sam_arch(image_size: int = 64) -> SamArch:
    """A SAM whose 16x16 embedding and 64x64 low-res mask fit the 64-pixel synthetic images."""
    return SamArch(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1],
                   image_size=image_size, patch_size=image_size // 16, window_size=4, prompt_embed_dim=32,
                   mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=128, decoder_num_heads=2,
                   iou_head_hidden_dim=32)


def tiny_sam2_config(image_size: int = 64) -> dict:
    """A model config for Meta's ``sam2`` package laid out as its ``sam2.1_hiera_t.yaml`` (the same
    classes, post-processing as ``build_sam2``), at small dims: Hiera 16-128 channels over 5 blocks,
    32-channel FPN and SAM heads, one tiny memory layer (image-only use never runs it, but
    ``SAM2Base`` builds it). ``image_size``: a multiple of 64. The "sam2" tool kind in tests."""
    if image_size % 64:
        raise ValueError(f"the tiny SAM2's image_size must be a multiple of 64, got {image_size}")
    d, mem, s = 32, 16, image_size // 16  # FPN/SAM width, memory width, image-embedding side

    def sine(n):
        return {"_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine", "num_pos_feats": n,
                "normalize": True, "scale": None, "temperature": 10000}

    def rope(**extra):
        return {"_target_": "sam2.modeling.sam.transformer.RoPEAttention", "rope_theta": 10000.0,
                "feat_sizes": [s, s], "embedding_dim": d, "num_heads": 1, "downsample_rate": 1, "dropout": 0.1,
                **extra}

    model = {
        "_target_": "sam2.modeling.sam2_base.SAM2Base",
        "image_encoder": {
            "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder", "scalp": 1,
            "trunk": {"_target_": "sam2.modeling.backbones.hieradet.Hiera", "embed_dim": 16, "num_heads": 1,
                      "stages": [1, 1, 2, 1], "global_att_blocks": [3], "window_spec": [8, 4, 4, 2],
                      "window_pos_embed_bkg_spatial_size": [4, 4]},
            "neck": {"_target_": "sam2.modeling.backbones.image_encoder.FpnNeck", "position_encoding": sine(d),
                     "d_model": d, "backbone_channel_list": [128, 64, 32, 16], "fpn_top_down_levels": [2, 3],
                     "fpn_interp_model": "nearest"}},
        "memory_attention": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttention", "d_model": d, "pos_enc_at_input": True,
            "num_layers": 1,
            "layer": {"_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer", "activation": "relu",
                      "dim_feedforward": 2 * d, "dropout": 0.1, "pos_enc_at_attn": False, "d_model": d,
                      "pos_enc_at_cross_attn_keys": True, "pos_enc_at_cross_attn_queries": False,
                      "self_attention": rope(), "cross_attention": rope(rope_k_repeat=True, kv_in_dim=mem)}},
        "memory_encoder": {
            "_target_": "sam2.modeling.memory_encoder.MemoryEncoder", "out_dim": mem, "in_dim": d,
            "position_encoding": sine(mem),
            "mask_downsampler": {"_target_": "sam2.modeling.memory_encoder.MaskDownSampler", "embed_dim": d,
                                 "kernel_size": 3, "stride": 2, "padding": 1},
            "fuser": {"_target_": "sam2.modeling.memory_encoder.Fuser", "num_layers": 1,
                      "layer": {"_target_": "sam2.modeling.memory_encoder.CXBlock", "dim": d, "kernel_size": 7,
                                "padding": 3, "layer_scale_init_value": 1e-6, "use_dwconv": True}}},
        "num_maskmem": 7, "image_size": image_size, "sigmoid_scale_for_mem_enc": 20.0,
        "sigmoid_bias_for_mem_enc": -10.0, "use_mask_input_as_output_without_sam": True,
        "directly_add_no_mem_embed": True, "no_obj_embed_spatial": True, "use_high_res_features_in_sam": True,
        "multimask_output_in_sam": True, "iou_prediction_use_sigmoid": True, "use_obj_ptrs_in_encoder": True,
        "add_tpos_enc_to_obj_ptrs": True, "proj_tpos_enc_in_obj_ptrs": True, "use_signed_tpos_enc_to_obj_ptrs": True,
        "only_obj_ptrs_in_the_past_for_eval": True, "pred_obj_scores": True, "pred_obj_scores_mlp": True,
        "fixed_no_obj_ptr": True, "multimask_output_for_tracking": True, "use_multimask_token_for_obj_ptr": True,
        "multimask_min_pt_num": 0, "multimask_max_pt_num": 1, "use_mlp_for_obj_ptr_proj": True,
        "compile_image_encoder": False,
        # SAM2's stability fallback off: trained from scratch on single-mask outputs, the tiny one's three
        # multimask tokens never train, and in eval the fallback would hand unstable masks to them
        "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": False,
                                        "dynamic_multimask_stability_delta": 0.05,
                                        "dynamic_multimask_stability_thresh": 0.98}}
    return {"model": model}


def tiny_sam2(image_size: int = 64, seed: int = 0):
    """A random-init tiny ``SAM2Base`` from ``tiny_sam2_config``, built by the sam2 package's own
    instantiation. Returns (model, config)."""
    from grto_cli.core.sam2_meta import build_sam2_model

    config = tiny_sam2_config(image_size)
    torch.manual_seed(seed)
    return build_sam2_model(config, "tiny SAM2").eval(), config


def tiny_sam2_hf(image_size: int = 64, seed: int = 0):
    """A random-init transformers ``Sam2Model`` at small dims (Hiera 16-128 channels over 5 blocks,
    32-channel FPN, prompt encoder and mask decoder) + its ``Sam2Processor`` resizing to
    ``image_size`` (a multiple of 64): the "sam2-hf" tool kind in tests. Returns (model, processor)."""
    from transformers import Sam2Config, Sam2Model

    from grto_cli.core.sam2_hf import Sam2HfTool

    if image_size % 64:
        raise ValueError(f"the tiny SAM2's image_size must be a multiple of 64, got {image_size}")
    s = image_size // 4  # Hiera's first stage: stride-4 patches; three 2x poolings follow
    config = Sam2Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                                 image_size=[image_size, image_size], blocks_per_stage=[1, 1, 2, 1],
                                 embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
                                 window_size_per_stage=[8, 4, 4, 2], global_attention_blocks=[3],
                                 window_positional_embedding_background_size=[4, 4]),
            backbone_channel_list=[128, 64, 32, 16], backbone_feature_sizes=[[s, s], [s // 2, s // 2], [s // 4, s // 4]],
            fpn_hidden_size=32),
        prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32,
                                 dynamic_multimask_via_stability=False))  # as tiny_sam2_config's, and why
    torch.manual_seed(seed)
    model = Sam2Model(config).eval()
    return model, Sam2HfTool.default_processor(model)


def tiny_sam_hf(image_size: int = 64, seed: int = 0):
    """A random-init transformers ``SamModel`` at small dims (a 2-layer, 64-wide ViT whose embedding
    is 16x16, a 32-channel prompt encoder and mask decoder) + its ``SamProcessor`` resizing the
    longest side to ``image_size`` and padding to that square: the "sam-hf" tool kind in tests.
    Returns (model, processor)."""
    from transformers import SamConfig, SamModel

    from grto_cli.core.sam_hf import SamHfTool

    if image_size % 16:
        raise ValueError(f"the tiny SAM's image_size must be a multiple of 16, got {image_size}")
    patch, width = image_size // 16, 32  # width: the embedding's, the prompt encoder's and the mask decoder's
    config = SamConfig(
        vision_config=dict(hidden_size=64, output_channels=width, num_hidden_layers=2, num_attention_heads=2,
                           mlp_dim=128, image_size=image_size, patch_size=patch, window_size=4,
                           global_attn_indexes=[1], num_pos_feats=width // 2),  # sin + cos features: width
        prompt_encoder_config=dict(hidden_size=width, image_size=image_size, patch_size=patch, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=32))
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    return model, SamHfTool.default_processor(model)
