import numpy as np
import pytest
import torch
from PIL import Image

from grto_cli.core.answer import ToolCall
from grto_cli.core.policy import encode_prompts, load_policy
from grto_cli.core.tiny import TinyVLMArch, build_tiny_vlm, tiny_sam_arch
from grto_cli.core.tool import SAM_PRESETS, SamTool, build_sam, load_sam, save_sam


@pytest.mark.parametrize("family, model_class", [("qwen3_vl", "Qwen3VLForConditionalGeneration"),
                                                  ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")])
def test_tiny_vlm_is_the_real_model_class_and_round_trips(tmp_path, family, model_class):
    arch = TinyVLMArch(family=family, initializer_range=0.06)
    model, processor = build_tiny_vlm(arch, seed=0)
    assert type(model).__name__ == model_class
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    # initializer_range sets the language model's initial weights (embeddings and head too); the
    # vision tower keeps its own
    lm = model.model.language_model
    assert abs(lm.layers[0].mlp.up_proj.weight.std().item() - 0.06) < 0.005
    assert abs(model.get_output_embeddings().weight.std().item() - 0.06) < 0.005
    assert abs(model.model.visual.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.003
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # the loader real checkpoints use; the tiny model answers in pixels whatever its family
    policy = load_policy(tmp_path, prompt_template="Locate: {query}.", coord_convention="absolute")
    assert type(policy.model).__name__ == model_class
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    batch = encode_prompts(policy, [image], ["the red circle"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, policy.model(**batch).logits)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    if family == "qwen3_vl":  # one learned position per patch of the 8x8 grid: no interpolation
        assert policy.model.model.visual.pos_embed.num_embeddings == 64


def test_an_unknown_tiny_family_is_refused():
    with pytest.raises(ValueError, match="qwen2_5_vl, qwen3_vl"):
        build_tiny_vlm(TinyVLMArch(family="llava"))


def test_tiny_sam_round_trips_through_the_official_loader(tmp_path):
    arch = tiny_sam_arch()
    sam = build_sam(arch)
    save_sam(sam, arch, tmp_path)
    loaded, loaded_arch = load_sam(tmp_path)
    assert loaded_arch == arch
    for (k, a), (k2, b) in zip(sam.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    tool = SamTool(loaded, loaded_arch)
    image = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    emb = tool.embed([image])
    logits = tool.decode(emb, [ToolCall(box=(4, 4, 30, 40), points=((10, 10),)), None], (64, 48))
    assert logits.shape == (2, 64, 48)
    assert (logits[1] < 0).all()  # an unparsable call gives no mask


def test_official_presets_match_segment_anything_builders():
    from segment_anything import sam_model_registry

    ours = build_sam(SAM_PRESETS["vit_b"]).state_dict()
    theirs = sam_model_registry["vit_b"]().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_missing_sam_checkpoint_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        load_sam(tmp_path / "sam_vit_h.pth", "vit_h")
