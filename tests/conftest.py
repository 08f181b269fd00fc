"""Shared fixtures. Tests never touch the network: the hub is forced offline here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(2)

TINY_SYSTEM_TEMPLATE = "Locate: {query}."


@pytest.fixture(autouse=True)
def _two_torch_threads():
    """Every test starts with the CI machine's 2 torch threads, whatever a stage run in-process set
    before it (`grto pretrain` gives the policy's warm-up half the threads): a test's floats, and
    what an RL run learns from them, must not depend on which tests ran first."""
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the prepared layout."""
    from grto_cli.core.data.records import write_manifest
    from grto_cli.core.data.synthetic import generate_split

    out = tmp_path_factory.mktemp("synthetic")
    for split, n in (("train", 40), ("val", 8), ("testA", 8), ("testB", 8)):
        write_manifest(out / f"{split}.jsonl", generate_split(split, n, 0, 64, out))
    return out


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory, synthetic_data) -> Path:
    """A barely trained tiny system in the checkpoint layout (<dir>/policy, <dir>/tool): the policy has
    had just enough warm-up to emit the answer format often, so rollouts have parsable calls."""
    from grto_cli.core.data.records import read_manifest
    from grto_cli.core.policy import load_policy
    from grto_cli.core.pretrain import PolicySftConfig, SamTrainConfig, train_policy_sft, train_sam
    from grto_cli.core.tiny import TinyVLMArch, build_tiny_vlm, tiny_sam_arch
    from grto_cli.core.tool import SamTool, build_sam, save_sam

    torch.set_num_threads(2)  # built before any test's own fixtures: the same weights whoever asks first
    out = tmp_path_factory.mktemp("system")
    records, _ = read_manifest(synthetic_data / "train.jsonl")
    arch = tiny_sam_arch()
    torch.manual_seed(0)  # SAM's initial weights: the same whichever tests ran before
    tool = SamTool(build_sam(arch), arch)
    train_sam(tool, records, synthetic_data, SamTrainConfig(steps=10, batch_size=4), seed=0)
    save_sam(tool.sam, arch, out / "tool")
    # The real pipelines' family (Qwen2.5-VL: absolute pixels); test_families checks the others and
    # test_tiny_models the embedded default's Qwen3-VL.
    model, processor = build_tiny_vlm(TinyVLMArch(family="qwen2_5_vl"), seed=0)
    model.save_pretrained(out / "policy")
    processor.save_pretrained(out / "policy")
    policy = load_policy(out / "policy", prompt_template=TINY_SYSTEM_TEMPLATE)
    train_policy_sft(policy, records, synthetic_data, PolicySftConfig(steps=60, batch_size=8, lr=3e-3), seed=0)
    policy.model.save_pretrained(out / "policy")
    return out


@pytest.fixture(scope="session")
def make_project(tmp_path_factory, tiny_system, synthetic_data):
    """``make_project(name)``: a fresh project directory laid out as `dvc repro` leaves it after
    prepare + pretrain (the root params.yaml, the prepared data, the tiny system as models/base)."""
    import shutil

    def make(name: str) -> Path:
        root = tmp_path_factory.mktemp(name)
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        # The tiny system's short warm-up taught the format under its own template only.
        params["policy"]["prompt_template"] = TINY_SYSTEM_TEMPLATE
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.copytree(synthetic_data, root / "data/prepared/synthetic")
        shutil.copytree(tiny_system, root / "models/base")
        return root

    return make
