"""The "sam2" tool kind (Meta's sam2 package, the optional extra grto[sam2]) behind the Tool interface:
parity with SAM2ImagePredictor on a checkpoint in Meta's official format, loading by kind and arch,
and what trains (GRTO through the trainer, resume and the CLI: tests/test_tool_kinds_training.py).

Every test but the first skips where the sam2 package is not installed (CI installs `.[dev]` only)."""

import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from grto_cli.core.answer import ToolCall
from grto_cli.core.grto import tool_loss
from grto_cli.core.tool_kinds import KIND_FILE, load_tool, tool_kind

needs_sam2 = pytest.mark.skipif(importlib.util.find_spec("sam2") is None,
                                reason="Meta's sam2 package is not installed (grto[sam2])")
# Non-square: SAM2's transforms squash it to the model's square (x by S/W, y by S/H).
SIZE = (48, 80)
CALLS = [ToolCall(box=(10, 8, 60, 40), points=((20, 30),)), ToolCall(box=(5, 20, 70, 44)),
         ToolCall(points=((40, 10), (12, 33))), None]


def test_missing_sam2_package_names_the_extra(tmp_path, monkeypatch):
    """Where the package is absent (CI), a SAM2 tool arch says which extra to install."""
    monkeypatch.setitem(sys.modules, "sam2", None)  # import sam2 -> ImportError, installed or not
    (tmp_path / "sam2.1_hiera_large.pt").write_bytes(b"")
    assert tool_kind(tmp_path / "sam2.1_hiera_large.pt", "sam2.1_hiera_l") == "sam2"
    assert tool_kind(tmp_path / "sam_vit_h.pth", "vit_h") == "sam"
    with pytest.raises(ImportError, match=r"grto\[sam2\]"):
        load_tool(tmp_path / "sam2.1_hiera_large.pt", "sam2.1_hiera_l")
    with pytest.raises(ValueError, match="expected a SAM preset .* or a SAM2 one"):
        load_tool(tmp_path / "sam2.1_hiera_large.pt", "sam2.1_hiera_x")


def _perturbed(model, seed=1, scale=0.3):
    """Random init's masks are nearly flat: make the prompt path's weights matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in [*model.sam_prompt_encoder.parameters(), *model.sam_mask_decoder.parameters()]:
            p.add_(torch.randn_like(p) * scale)
    return model


def _reference(predictor, call: ToolCall) -> torch.Tensor:
    """SAM2ImagePredictor.predict, single mask, logits kept: (H, W)."""
    prompts = {}
    if call.points:
        prompts["point_coords"] = np.array(call.points, dtype=np.float32)
        prompts["point_labels"] = np.ones(len(call.points), dtype=np.int64)
    if call.box is not None:
        prompts["box"] = np.array(call.box, dtype=np.float32)
    masks, _, _ = predictor.predict(multimask_output=False, return_logits=True, **prompts)
    return torch.from_numpy(masks[0])


def _check_parity(tool, predictor, image, calls, size):
    predictor.set_image(image)
    embedding = tool.embed([image])
    assert len(embedding.levels) == 3
    with torch.no_grad():
        logits = tool.decode(embedding, calls, size)  # (N, H, W)
    assert logits.shape == (len(calls), *size)
    for i, call in enumerate(calls):
        if call is None:
            assert torch.all(logits[i] == -20.0)  # an unparsable call: no mask
            continue
        reference = _reference(predictor, call)
        assert reference.std() > 0.5, "a flat map would match anything"
        assert float((logits[i] - reference).abs().max()) <= 1e-5, call
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3  # the point reaches the decoder
    return logits


@needs_sam2
def test_decode_matches_sam2_image_predictor_on_an_official_format_checkpoint(tmp_path):
    """SAM2.1 Hiera-T's real config, random init, written as Meta's .pt files are ({"model": ...}) and
    read by both sides: Meta's build_sam2 + SAM2ImagePredictor, and grto's load_tool with the arch."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.manual_seed(0)
    model = _perturbed(build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu"), scale=0.05)
    torch.save({"model": model.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    reference = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(tmp_path / "sam2.1_hiera_tiny.pt"), device="cpu")
    tool = load_tool(tmp_path / "sam2.1_hiera_tiny.pt", "sam2.1_hiera_t")
    assert tool.kind == "sam2" and tool.model.image_size == 1024
    for attr in ("dynamic_multimask_via_stability", "dynamic_multimask_stability_delta",
                 "dynamic_multimask_stability_thresh"):  # build_sam2's post-processing, as its predictor
        assert getattr(tool.model.sam_mask_decoder, attr) == getattr(reference.sam_mask_decoder, attr)
    size = (300, 500)  # resized to 1024x1024: x by 1024/500, y by 1024/300
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    calls = [ToolCall(box=(50, 40, 300, 200), points=((100, 120),)), ToolCall(box=(50, 40, 300, 200)),
             ToolCall(points=((200, 50), (60, 160))), None]
    _check_parity(tool, SAM2ImagePredictor(reference), image, calls, size)


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    """The tiny SAM2 (the package's own modules, small dims) saved as grto saves a "sam2" tool."""
    pytest.importorskip("sam2")
    from grto_cli.core.sam2_meta import Sam2Tool
    from grto_cli.core.tiny import tiny_sam2

    model, config = tiny_sam2(64, seed=0)
    out = tmp_path_factory.mktemp("sam2_meta")
    Sam2Tool(_perturbed(model), config).save(out)
    return out


def _image(seed=0, size=SIZE):
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@needs_sam2
def test_tiny_sam2_matches_the_predictor_too(sam2_dir):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    tool = load_tool(sam2_dir)
    predictor = SAM2ImagePredictor(load_tool(sam2_dir).model)
    predictor._bb_feat_sizes = [(16, 16), (8, 8), (4, 4)]  # the predictor assumes 1024 pixels; these are 64's
    assert not tool.model.sam_mask_decoder.dynamic_multimask_via_stability  # the tiny one's (tiny_sam2_config)
    _check_parity(tool, predictor, _image(), CALLS, SIZE)
    # the same with SAM2's stability fallback on, as build_sam2 sets it for Meta's checkpoints
    for model in (tool.model, predictor.model):
        model.sam_mask_decoder.dynamic_multimask_via_stability = True
    _check_parity(tool, predictor, _image(1), CALLS, SIZE)


@needs_sam2
def test_directories_kinds_and_configs(sam2_dir, tmp_path):
    assert sorted(p.name for p in sam2_dir.iterdir()) == ["sam2.pt", "sam2.yaml", KIND_FILE]
    assert tool_kind(sam2_dir) == "sam2"
    tool = load_tool(sam2_dir)
    # sam2.pt is Meta's format: the state dict under "model", as build_sam2 reads it
    state = torch.load(sam2_dir / "sam2.pt", map_location="cpu", weights_only=True)["model"]
    assert state.keys() == tool.model.state_dict().keys()
    tool.save(tmp_path / "saved")
    reloaded = load_tool(tmp_path / "saved")
    a, b = tool.model.state_dict(), reloaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a bare file in Meta's format with the config as the arch
    shutil.copy(sam2_dir / "sam2.pt", tmp_path / "bare.pt")
    config = yaml.safe_load((sam2_dir / "sam2.yaml").read_text())
    assert tool_kind(tmp_path / "bare.pt", config) == "sam2"
    assert all(torch.equal(a[k], v) for k, v in load_tool(tmp_path / "bare.pt", config).model.state_dict().items())
    # weights that do not fit the arch, a config that builds something outside the package
    with pytest.raises(ValueError, match="do not fit the SAM2 arch"):
        load_tool(tmp_path / "bare.pt", "sam2.1_hiera_t")
    bad = tmp_path / "bad"
    shutil.copytree(sam2_dir, bad)
    config["model"]["image_encoder"]["trunk"]["_target_"] = "os.system"
    (bad / "sam2.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="holds a 'sam2' tool, expected 'sam'"):
        from grto_cli.core.tiny import tiny_sam_arch
        from grto_cli.core.tool import SamTool, build_sam

        SamTool(build_sam(tiny_sam_arch()), tiny_sam_arch()).load_weights(sam2_dir)
    with pytest.raises(ValueError, match=r"bad/sam2.yaml: _target_ 'os.system' is outside"):
        load_tool(bad)
    shutil.copy(sam2_dir / "sam2.yaml", bad / "sam2.yaml")
    torch.save(tool.model.state_dict(), bad / "sam2.pt")  # a bare state dict, not Meta's format
    with pytest.raises(ValueError, match="not a SAM2 checkpoint in Meta's format"):
        load_tool(bad)


@needs_sam2
def test_only_prompt_encoder_and_mask_decoder_train(sam2_dir):
    tool = load_tool(sam2_dir)
    tool.freeze_image_encoder()
    trainable = {id(p) for p in tool.trainable_parameters()}
    names = {n for n, p in tool.model.named_parameters() if id(p) in trainable}
    assert names and all(n.startswith(("sam_prompt_encoder.", "sam_mask_decoder.")) for n in names)
    assert not any(".conv_s0." in n or ".conv_s1." in n for n in names)  # inside the cached features
    assert {n for n, p in tool.model.named_parameters() if p.requires_grad} == names
    target = torch.zeros(SIZE, dtype=torch.bool)
    target[10:30, 12:40] = True
    tool.train()
    loss, n_valid = tool_loss(tool, tool.embed([_image()]), [CALLS], [target])
    loss.backward()
    assert n_valid == 3
    decoder = tool.model.sam_mask_decoder
    for part in (tool.model.sam_prompt_encoder, decoder.transformer, decoder.output_upscaling):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for n, p in tool.model.named_parameters() if id(p) not in trainable)
    assert not tool.model.image_encoder.training and decoder.training
