"""B-GRTO's bootstrap (core/bootstrap.py): which queries, cached rewards, the tool steps' weighting and clipping."""

from __future__ import annotations

import pytest

from grto_cli.core.bootstrap import BootstrapConfig, collect_rollouts, sample_scenes, train_tool_on_cache
from grto_cli.core.checkpoint import load_system, system_paths
from grto_cli.core.data.records import read_manifest
from grto_cli.core.data.synthetic import generate_split
from grto_cli.core.rewards import RewardWeights

TEMPLATE = "Locate: {query}."


def test_sample_scenes_takes_whole_scenes_drawn_by_seed(tmp_path):
    records = generate_split("train", 40, seed=0, size=32, out_dir=tmp_path, queries_per_image=4)
    scenes = {}
    for r in records:
        scenes.setdefault(r.image, []).append(r.id)
    assert max(len(v) for v in scenes.values()) > 1, "the fixture needs scenes with several queries"
    k = len(records) // 2
    a, b, other = sample_scenes(records, k, 0), sample_scenes(records, k, 0), sample_scenes(records, k, 1)
    assert [r.id for r in a] == [r.id for r in b] and [r.id for r in a] != [r.id for r in other]
    assert len(a) >= k
    for image in {r.image for r in a}:  # every chosen scene with all of its queries
        assert sorted(r.id for r in a if r.image == image) == sorted(scenes[image])
    assert [r.id for r in a[:k]] != [r.id for r in records[:k]]  # not the split's first records
    assert [r.id for r in sample_scenes(records, None, 0)] == [r.id for r in records]


WEIGHTS = RewardWeights(format=0.5, format_penalty=0.7, iou=1.0, box_iou=1.0, point=0.5)


@pytest.fixture(scope="module")
def cache(tiny_system, synthetic_data):
    """Six queries' cached rollouts (K=4) from the fixture system, sampled once for this module."""
    policy, tool = load_system(system_paths(tiny_system), TEMPLATE)
    records, _ = read_manifest(synthetic_data / "train.jsonl")
    cfg = BootstrapConfig(rollouts_per_query=4, generation_batch=3, max_new_tokens=32, steps=3, batch_size=2, lr=1e-3)
    rows = list(collect_rollouts(policy, tool, records[:6], synthetic_data, cfg, 0, WEIGHTS))
    return tool, records, cfg, rows


def test_each_cached_rollout_carries_its_reward(cache):
    _, _, _, rows = cache
    rewards = [(call, r) for row in rows for call, r in zip(row["calls"], row["rewards"])]
    assert len(rewards) == 24
    assert any(c is None for c, _ in rewards) and any(c is not None for c, _ in rewards)
    for call, r in rewards:
        if call is None:
            assert r == -0.7  # the format penalty, nothing else
        else:
            assert 0.5 <= r <= 0.5 + 1.0 + 1.0 + 0.5
    assert any(r > 0.5 for c, r in rewards if c is not None), "no parsable call earned a term beyond format"


def test_tool_steps_weight_rollouts_as_rl_does_and_clip_the_gradient(cache, synthetic_data):
    """Positive weighting: groups with no above-mean rollout train nothing, so a cache of flat
    groups leaves the tool as it is while uniform weighting moves it; a clipped gradient under
    Adam moves it only as far as eps lets a vanishing gradient."""
    tool, records, cfg, rows = cache
    before = {k: v.clone() for k, v in tool.sam.state_dict().items()}

    def moved(**changes):
        for k, v in before.items():
            tool.sam.state_dict()[k].copy_(v)
        flat_rows = [{**row, "rewards": [1.0] * len(row["calls"])} for row in rows] if changes.pop("flat", False) else rows
        run_cfg = BootstrapConfig(**{**cfg.__dict__, **changes})
        train_tool_on_cache(tool, flat_rows, {r.id: r for r in records}, synthetic_data, run_cfg, seed=0)
        return max(float((tool.sam.state_dict()[k] - v).abs().max()) for k, v in before.items())

    assert moved() > 1e-4
    assert moved(tool_weighting="positive") > 1e-4  # the sampled groups have above-mean rollouts
    assert moved(tool_weighting="positive", flat=True) == 0.0
    assert moved(flat=True) > 1e-4  # uniform: flat groups still train the tool
    assert moved(max_grad_norm=1e-12) < 1e-5
