"""The "sam2-hf" tool kind (transformers' Sam2Model) behind the Tool interface: parity with
transformers' own processor + model, the embedding cache over every feature level, loading by kind,
and what trains (GRTO through the trainer, resume and the CLI: tests/test_tool_kinds_training.py)."""


import numpy as np
import pytest
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.grto import tool_loss
from grto_cli.core.sam2_hf import Sam2HfTool
from grto_cli.core.tiny import tiny_sam2_hf, tiny_sam_arch
from grto_cli.core.tool import EmbeddingCache, FeatureLevels, SamTool, build_sam
from grto_cli.core.tool_kinds import KIND_FILE, load_tool, tool_kind

# A non-square image: the processor squashes it to 64x64 (x by 64/80, y by 64/48).
SIZE = (48, 80)
CALLS = [ToolCall(box=(10, 8, 60, 40), points=((20, 30),)), ToolCall(box=(5, 20, 70, 44)),
         ToolCall(points=((40, 10), (12, 33))), None]


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    """A tiny random-init Sam2Model saved as transformers saves one (no grto file in it)."""
    model, processor = tiny_sam2_hf(64, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # random init's masks are nearly flat (weights ~0.02): make them depend on the prompt
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path_factory.mktemp("sam2_hf")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _image(seed=0, size=SIZE):
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _reference_logits(tool: Sam2HfTool, image: np.ndarray, call: ToolCall) -> torch.Tensor:
    """transformers' own pipeline: Sam2Processor -> Sam2Model.forward -> post_process_masks (logits kept)."""
    prompts = {}
    if call.points:
        prompts["input_points"] = [[[list(p) for p in call.points]]]
        prompts["input_labels"] = [[[1] * len(call.points)]]
    if call.box is not None:
        prompts["input_boxes"] = [[list(call.box)]]
    inputs = tool.processor(images=image, return_tensors="pt", **prompts)
    with torch.no_grad():
        out = tool.model(**inputs, multimask_output=False)
    masks = tool.processor.post_process_masks(out.pred_masks, inputs["original_sizes"], binarize=False)
    return masks[0][0, 0]  # (H, W)


def test_decode_matches_transformers_processor_and_model(sam2_dir):
    tool = load_tool(sam2_dir)
    assert isinstance(tool, Sam2HfTool) and tool.kind == "sam2-hf" and tool_kind(sam2_dir) == "sam2-hf"
    image = _image()
    embedding = tool.embed([image])
    assert isinstance(embedding, FeatureLevels) and len(embedding.levels) == 3
    with torch.no_grad():
        logits = tool.decode(embedding, CALLS, SIZE)  # (N, H, W)
    assert logits.shape == (len(CALLS), *SIZE)
    assert tool.processor(images=image, return_tensors="pt")["pixel_values"].shape[-2:] == (64, 64)  # really resized
    for i, call in enumerate(CALLS[:3]):
        reference = _reference_logits(tool, image, call)
        assert reference.std() > 1.0, "a flat map would match anything"
        assert float((logits[i] - reference).abs().max()) <= 1e-5, call
    # the same with SAM2's stability fallback on (the tiny one has it off: tiny_sam2_hf), as Meta's checkpoints
    assert not tool.model.mask_decoder.dynamic_multimask_via_stability
    tool.model.mask_decoder.dynamic_multimask_via_stability = True
    with torch.no_grad():
        single = tool.decode(embedding, CALLS[:1], SIZE)
    assert float((single[0] - _reference_logits(tool, image, CALLS[0])).abs().max()) <= 1e-5
    # the box + point call is not the box alone: the prompt reaches the decoder
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3
    assert torch.all(logits[3] == -20.0)  # an unparsable call: no mask


def test_embed_caches_every_level_within_the_byte_budget(sam2_dir, tmp_path):
    tool = load_tool(sam2_dir)
    images = [_image(0), _image(1), _image(2)]
    one = tool.embed(images[:1], ["a"])
    per_image = sum(level.nelement() * level.element_size() for level in one.levels)
    assert [tuple(level.shape) for level in one.levels] == [(1, 4, 16, 16), (1, 8, 8, 8), (1, 32, 4, 4)]
    assert tool.embedding_cache.bytes == per_image  # the high-resolution levels are counted too
    # a budget of two images keeps the last two
    cache = EmbeddingCache(max_bytes=2 * per_image)
    tool.embedding_cache = cache
    batch = tool.embed(images, ["a", "b", "c"])
    assert len(batch) == 3 and len(cache) == 2 and cache.bytes == 2 * per_image and cache.get("a") is None
    # slices and concatenation along the image axis give back the same features
    again = tool.embed([images[2], images[1]], ["c", "b"])
    assert cache.hits == 2
    for level, whole in zip(again.levels, batch.levels):
        assert torch.equal(level[0], whole[2]) and torch.equal(level[1], whole[1])
    # and so does the disk copy, read by a cache that never saw them
    tool.embedding_cache = EmbeddingCache(disk_dir=tmp_path / "disk")
    encoded = tool.embed(images[1:2], ["b"])
    from_disk = EmbeddingCache(disk_dir=tmp_path / "disk").get("b")
    assert isinstance(from_disk, FeatureLevels)
    assert all(torch.equal(a, b) for a, b in zip(from_disk.levels, encoded.levels))


def test_tool_kinds_registry_and_directories(sam2_dir, tmp_path):
    tool = load_tool(sam2_dir)
    tool.save(tmp_path / "saved")
    assert tool_kind(tmp_path / "saved") == "sam2-hf" and (tmp_path / "saved" / KIND_FILE).is_file()
    reloaded = load_tool(tmp_path / "saved")
    saved, loaded = tool.model.state_dict(), reloaded.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # SAM's directories carry no kind file, as before: absent means "sam"
    arch = tiny_sam_arch()
    sam = SamTool(build_sam(arch), arch)
    sam.save(tmp_path / "sam")
    assert sorted(p.name for p in (tmp_path / "sam").iterdir()) == ["sam.pt", "sam.yaml"]
    assert tool_kind(tmp_path / "sam") == "sam" and isinstance(load_tool(tmp_path / "sam"), SamTool)
    # weights of one kind never load into another
    with pytest.raises(ValueError, match="holds a 'sam2-hf' tool, expected 'sam'"):
        sam.load_weights(tmp_path / "saved")
    with pytest.raises(ValueError, match="holds a 'sam' tool, expected 'sam2-hf'"):
        reloaded.load_weights(tmp_path / "sam")
    (tmp_path / "saved" / KIND_FILE).write_text("kind: sam9\n")
    with pytest.raises(ValueError, match="unknown tool kind 'sam9'"):
        load_tool(tmp_path / "saved")
    with pytest.raises(ValueError, match="tool arch"):
        load_tool(sam2_dir, "vit_h")


def test_only_prompt_encoder_and_mask_decoder_train(sam2_dir):
    tool = load_tool(sam2_dir)
    tool.freeze_image_encoder()
    trainable = {id(p) for p in tool.trainable_parameters()}
    names = {n for n, p in tool.model.named_parameters() if id(p) in trainable}
    assert names and all(n.startswith(("prompt_encoder.", "mask_decoder.")) for n in names)
    assert not any(".conv_s0." in n or ".conv_s1." in n for n in names)  # inside the cached features
    assert {n for n, p in tool.model.named_parameters() if p.requires_grad} == names
    target = torch.zeros(SIZE, dtype=torch.bool)
    target[10:30, 12:40] = True
    loss, n_valid = tool_loss(tool, tool.embed([_image()]), [CALLS], [target])
    loss.backward()
    assert n_valid == 3
    for part in (tool.model.prompt_encoder, tool.model.mask_decoder.transformer, tool.model.mask_decoder.upscale_conv1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for n, p in tool.model.named_parameters() if id(p) not in trainable)
