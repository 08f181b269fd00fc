"""The tool's batched, differentiable decode against segment-anything's own predictor."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from grto_cli.core.answer import ToolCall
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import SamTool, build_sam


@pytest.mark.parametrize("call", [ToolCall(box=(10.0, 5.0, 70.0, 30.0), points=((40.0, 18.0),)),
                                  ToolCall(points=((20.0, 30.0), (80.0, 10.0))),
                                  ToolCall(box=(50.0, 2.0, 95.0, 38.0))])
def test_decode_matches_sam_predictor_on_an_image_sam_resizes(call):
    """A 40x96 image: SAM (input 64) resizes it by 2/3 and pads it to a square, so prompts in
    original pixels must go through the same coordinate transform as SamPredictor's."""
    torch.manual_seed(0)
    arch = tiny_sam_arch()
    sam = build_sam(arch).eval()
    tool = SamTool(sam, arch)
    image = np.random.default_rng(0).integers(0, 255, (40, 96, 3), dtype=np.uint8)
    assert tool.input_size(image.shape[:2]) != image.shape[:2]  # really resized
    with torch.no_grad():
        ours = tool.decode(tool.embed([image]), [call], image.shape[:2])[0].numpy()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    points = np.array(call.points, dtype=np.float32) if call.points else None
    labels = np.ones(len(call.points), dtype=np.int64) if call.points else None
    box = np.array(call.box, dtype=np.float32) if call.box else None
    theirs, _, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                     multimask_output=False, return_logits=True)
    assert ours.shape == theirs[0].shape == image.shape[:2]
    np.testing.assert_allclose(ours, theirs[0], atol=1e-4)


def _counting_encoder(sam):
    """Counts image-encoder passes and the images in each."""
    seen: list[int] = []
    sam.image_encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


def test_encode_runs_in_chunks_of_encode_batch_with_the_same_embeddings():
    torch.manual_seed(0)
    arch = tiny_sam_arch()
    sam = build_sam(arch).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 4 * i, 64, 3), dtype=np.uint8) for i in range(5)]
    seen = _counting_encoder(sam)
    chunked = SamTool(sam, arch, encode_batch=2).embed(images)
    assert seen == [2, 2, 1]  # 5 images, encode_batch 2: three passes
    one_by_one = torch.cat([SamTool(sam, arch, encode_batch=1).embed([im]) for im in images])
    assert chunked.shape == one_by_one.shape == (5, arch.prompt_embed_dim, 16, 16)
    torch.testing.assert_close(chunked, one_by_one, atol=1e-5, rtol=1e-5)


def test_a_batchs_duplicate_images_are_encoded_once():
    """G copies of one prompt image (keyed or not) cost one encoder pass."""
    arch = tiny_sam_arch()
    sam = build_sam(arch).eval()
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    seen = _counting_encoder(sam)
    tool = SamTool(sam, arch, encode_batch=8)
    out = tool.embed([a, b, a.copy(), a])
    assert seen == [2] and torch.equal(out[0], out[2]) and torch.equal(out[0], out[3])
    out = tool.embed([b, b, a], keys=["b", "b", "a"])
    assert seen == [2, 2] and tool.embedding_cache.misses == 2
    tool.embed([a, b], keys=["a", "b"])
    assert seen == [2, 2] and tool.embedding_cache.hits == 2  # both from the cache: no pass


def test_cached_embeddings_live_on_the_cpu_within_a_byte_budget():
    from grto_cli.core.tool import EmbeddingCache

    one = torch.zeros(1, 32, 16, 16)
    size = one.nelement() * one.element_size()
    cache = EmbeddingCache(max_bytes=2 * size)
    for key in "abc":
        cache.put(key, one + ord(key))
    assert len(cache) == 2 and cache.bytes == 2 * size <= cache.max_bytes
    assert cache.get("a") is None and cache.get("b") is not None  # least recently used went first
    cache.put("d", one)  # "c" is now the least recently used
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    assert all(v.device.type == "cpu" and not v.requires_grad for v in cache._items.values())
    off = EmbeddingCache(max_bytes=0)  # a zero budget caches nothing
    off.put("x", one)
    assert len(off) == 0 and off.get("x") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on CPU every tensor is on the CPU already")
def test_embeddings_computed_on_the_gpu_are_cached_on_the_cpu():
    arch = tiny_sam_arch()
    tool = SamTool(build_sam(arch).eval().cuda(), arch)
    image = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = tool.embed([image], keys=["img"])
    assert out.device.type == "cuda" and tool.embedding_cache.get("img").device.type == "cpu"


def test_the_tool_section_reaches_the_loaded_tool(tiny_system, tmp_path):
    from grto_cli.core.checkpoint import system_paths
    from grto_cli.stages.params import Params
    from grto_cli.stages.sections import PolicyParams, ToolParams
    from grto_cli.stages.system import load_stage_system

    params = tmp_path / "params.yaml"
    params.write_text("policy: {device: cpu}\ntool: {encode_batch: 3, cache_bytes: 12345}\n")
    read = Params(params)
    _, tool = load_stage_system(system_paths(str(tiny_system)), read.section(PolicyParams, "policy"),
                                read.section(ToolParams, "tool"))
    assert tool.encode_batch == 3 and tool.embedding_cache.max_bytes == 12345
