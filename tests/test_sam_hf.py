"""The "sam-hf" tool kind (transformers' SamModel, the original SAM) behind the Tool interface: parity
with transformers' own processor + model + post_process_masks, the embedding cache, loading by kind,
and what GRTO trains."""

import numpy as np
import pytest
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.grto import tool_loss
from grto_cli.core.sam2_hf import Sam2HfTool
from grto_cli.core.sam_hf import SamHfTool
from grto_cli.core.tiny import tiny_sam2_hf, tiny_sam_arch, tiny_sam_hf
from grto_cli.core.tool import EmbeddingCache, SamTool, build_sam
from grto_cli.core.tool_kinds import KIND_FILE, load_tool, tool_kind

# A non-square image: the processor resizes its longest side to 64 (48x80 -> 38x64: x and y both by
# 64/80, rounded) and pads the bottom 26 rows to a 64x64 square.
SIZE = (48, 80)
RESIZED = (38, 64)
CALLS = [ToolCall(box=(10, 8, 60, 40), points=((20, 30),)), ToolCall(box=(5, 20, 70, 44)),
         ToolCall(points=((40, 10), (12, 33))), None]


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    """A tiny random-init SamModel saved as transformers saves one (no grto file in it)."""
    model, processor = tiny_sam_hf(64, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # random init's masks are nearly flat (weights ~0.02): make them depend on the prompt
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # (0.3 leaves this tiny SAM's maps with std < 1)
    out = tmp_path_factory.mktemp("sam_hf")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _image(seed=0, size=SIZE):
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _reference_logits(tool: SamHfTool, image: np.ndarray, call: ToolCall) -> torch.Tensor:
    """transformers' own pipeline: SamProcessor -> SamModel.forward -> post_process_masks (logits kept)."""
    prompts = {}
    if call.points:
        prompts["input_points"] = [[[list(p) for p in call.points]]]
        prompts["input_labels"] = [[[1] * len(call.points)]]
    if call.box is not None:
        prompts["input_boxes"] = [[list(call.box)]]
    inputs = tool.processor(images=image, return_tensors="pt", **prompts)
    with torch.no_grad():
        out = tool.model(**inputs, multimask_output=False)
    masks = tool.processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                              binarize=False)
    return masks[0][0, 0]  # (H, W)


def test_decode_matches_transformers_processor_and_model(sam_dir):
    tool = load_tool(sam_dir)
    assert isinstance(tool, SamHfTool) and tool.kind == "sam-hf" and tool_kind(sam_dir) == "sam-hf"
    image = _image()
    inputs = tool.processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (64, 64) and tuple(inputs["reshaped_input_sizes"][0]) == RESIZED
    assert torch.all(inputs["pixel_values"][..., RESIZED[0]:, :] == 0)  # really padded below the resized image
    embedding = tool.embed([image])
    assert embedding.shape == (1, 32, 16, 16)
    with torch.no_grad():
        logits = tool.decode(embedding, CALLS, SIZE)  # (N, H, W)
    assert logits.shape == (len(CALLS), *SIZE)
    for i, call in enumerate(CALLS[:3]):
        reference = _reference_logits(tool, image, call)
        assert reference.std() > 1.0, "a flat map would match anything"
        assert float((logits[i] - reference).abs().max()) <= 1e-5, call
    # the box + point call is not the box alone: the prompt reaches the decoder
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3
    assert torch.all(logits[3] == -20.0)  # an unparsable call: no mask


def test_embed_caches_within_the_byte_budget(sam_dir):
    tool = load_tool(sam_dir)
    images = [_image(0), _image(1), _image(2)]
    one = tool.embed(images[:1], ["a"])
    per_image = one.nelement() * one.element_size()
    assert tool.embedding_cache.bytes == per_image
    cache = EmbeddingCache(max_bytes=2 * per_image)  # a budget of two images keeps the last two
    tool.embedding_cache = cache
    batch = tool.embed(images, ["a", "b", "c"])
    assert batch.shape == (3, 32, 16, 16) and len(cache) == 2 and cache.bytes == 2 * per_image
    assert cache.get("a") is None and torch.equal(cache.get("c")[0], batch[2])


def test_tool_kinds_registry_and_directories(sam_dir, tmp_path):
    assert not (sam_dir / KIND_FILE).exists()  # a bare save_pretrained directory: config.json says "sam"
    tool = load_tool(sam_dir)
    tool.save(tmp_path / "saved")
    assert tool_kind(tmp_path / "saved") == "sam-hf" and (tmp_path / "saved" / KIND_FILE).is_file()
    reloaded = load_tool(tmp_path / "saved")
    saved, loaded = tool.model.state_dict(), reloaded.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    reloaded.load_weights(sam_dir)  # the bare directory is a sam-hf one too
    # segment-anything's SAM and transformers' SAM2 beside it
    arch = tiny_sam_arch()
    sam = SamTool(build_sam(arch), arch)
    sam.save(tmp_path / "sam")
    assert tool_kind(tmp_path / "sam") == "sam" and isinstance(load_tool(tmp_path / "sam"), SamTool)
    sam2 = Sam2HfTool(*tiny_sam2_hf(64))
    sam2.save(tmp_path / "sam2")
    assert tool_kind(tmp_path / "sam2") == "sam2-hf"
    # weights of one kind never load into another
    with pytest.raises(ValueError, match="holds a 'sam-hf' tool, expected 'sam'"):
        sam.load_weights(tmp_path / "saved")
    with pytest.raises(ValueError, match="holds a 'sam-hf' tool, expected 'sam2-hf'"):
        sam2.load_weights(sam_dir)
    with pytest.raises(ValueError, match="holds a 'sam' tool, expected 'sam-hf'"):
        reloaded.load_weights(tmp_path / "sam")
    with pytest.raises(ValueError, match="holds a 'sam2-hf' tool, expected 'sam-hf'"):
        reloaded.load_weights(tmp_path / "sam2")
    with pytest.raises(ValueError, match="tool arch"):
        load_tool(sam_dir, "vit_b")


def test_only_prompt_encoder_and_mask_decoder_train(sam_dir):
    tool = load_tool(sam_dir)
    model = tool.model
    tool.freeze_image_encoder()
    trainable = {id(p) for p in tool.trainable_parameters()}
    # every name of every parameter: transformers ties shared_image_embedding's matrix to the prompt encoder's
    named = list(model.named_parameters(remove_duplicate=False))
    names = {n for n, p in named if id(p) in trainable}
    shared = "shared_image_embedding.positional_embedding"
    tied = model.prompt_encoder.shared_embedding.positional_embedding
    assert model.shared_image_embedding.positional_embedding is tied
    assert names and all(n.startswith(("prompt_encoder.", "mask_decoder.")) or n == shared for n in names)
    assert shared in names and not any(n.startswith("vision_encoder.") for n in names)
    assert {n for n, p in named if p.requires_grad} == names
    target = torch.zeros(SIZE, dtype=torch.bool)
    target[10:30, 12:40] = True
    loss, n_valid = tool_loss(tool, tool.embed([_image()]), [CALLS], [target])
    loss.backward()
    assert n_valid == 3
    for part in (model.prompt_encoder, model.mask_decoder.transformer, model.mask_decoder.upscale_conv1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.shared_image_embedding.positional_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in named if id(p) not in trainable)


def test_a_transformers_without_the_model_gets_an_error_naming_the_version_needed(monkeypatch):
    monkeypatch.setattr(SamHfTool, "classes", ("NoSuchSamModel", "SamProcessor", "SamImageProcessor"))
    with pytest.raises(ImportError, match=r"sam-hf tool needs transformers with NoSuchSamModel \(transformers >= 4\.29\)"):
        SamHfTool.transformers_classes()
