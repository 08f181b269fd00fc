import hashlib

import numpy as np
from typer.testing import CliRunner

from grto_cli.cli import app
from grto_cli.core.data.records import read_manifest
from grto_cli.core.data.synthetic import (HELD_OUT_COMPOSITIONS, Shape, candidate_queries, generate_split,
                                          render_scene)

SIZES = "{train: 120, val: 10, testA: 30, testB: 30}"


def _prepare(tmp_path, name, seed=0):
    out = tmp_path / name
    result = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--seed", str(seed),
                                      "--set", f"prepare.sizes={SIZES}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "run.json"):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_byte_identical_outputs(tmp_path):
    a, b = _prepare(tmp_path, "a"), _prepare(tmp_path, "b")
    for split in ("train", "val", "testA", "testB"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    assert _digest(a) == _digest(b)
    c = _prepare(tmp_path, "c", seed=1)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_testB_compositions_are_absent_from_train(tmp_path):
    out = _prepare(tmp_path, "d")
    train, _ = read_manifest(out / "train.jsonl")
    test_b, _ = read_manifest(out / "testB.jsonl")
    train_comps = {r.meta["composition"] for r in train}
    test_b_comps = {r.meta["composition"] for r in test_b}
    assert test_b_comps and test_b_comps <= HELD_OUT_COMPOSITIONS
    assert not (train_comps & test_b_comps)
    # The held-out phrasings never appear in a train query either.
    train_text = {r.query for r in train}
    for r in test_b:
        assert r.query not in train_text


def test_every_query_has_exactly_one_target_and_kinds_are_mixed(tmp_path):
    records = generate_split("train", 60, 3, 64, tmp_path)
    kinds = {r.meta["query_kind"] for r in records}
    assert {"attribute", "relation", "superlative", "only"} <= kinds
    for r in records:
        assert r.decode_mask().sum() >= 24


def test_candidate_queries_are_unambiguous():
    shapes = [Shape("circle", "red", 10, 32, 6), Shape("square", "blue", 40, 32, 6),
              Shape("square", "red", 54, 10, 5)]
    image, masks = render_scene(shapes, 64, 200)
    queries = {q.text: q.target for q in candidate_queries(shapes, [int(m.sum()) for m in masks])}
    assert queries["the red circle"] == 0
    assert queries["the only circle"] == 0
    assert queries["the shape left of the blue square"] == 0
    assert queries["the shape that is not red"] == 1
    assert "the red shape" not in queries  # two red shapes: ambiguous, never asked
    assert image.shape == (64, 64, 3)


def test_several_queries_per_image_ask_about_different_shapes(tmp_path):
    records = generate_split("train", 80, 0, 64, tmp_path, queries_per_image=4)
    assert len(records) == 80 and len({r.id for r in records}) == 80
    by_image: dict[str, list] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    assert max(len(v) for v in by_image.values()) == 4 and len(by_image) < 40
    multi = [rs for rs in by_image.values() if len(rs) > 1]
    for rs in multi:
        assert len({r.query for r in rs}) == len(rs)  # never the same query twice on one image
    # the same image with different answers (unless every query the scene allows names one shape)
    varied = sum(len({r.decode_mask().tobytes() for r in rs}) >= 2 for rs in multi)
    assert varied >= 0.8 * len(multi)
    # one query per image stays what it was: one image per record
    single = generate_split("train", 20, 0, 64, tmp_path / "single")
    assert len({r.image for r in single}) == 20


def test_pick_queries_covers_different_shapes_before_repeating_one():
    from grto_cli.core.data.synthetic import Query, pick_queries

    queries = [Query(f"q{i}", 0, "attribute", "c") for i in range(5)] + [Query("other", 1, "attribute", "c")]
    for seed in range(20):
        chosen = pick_queries(np.random.default_rng(seed), queries, 2)
        assert {q.target for q in chosen} == {0, 1}
        assert len(pick_queries(np.random.default_rng(seed), queries, 10)) == 6  # never more than there are


def _prepare_look(tmp_path, name, look, seed=0):
    out = tmp_path / name
    result = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--seed", str(seed), "--look", look,
                                      "--set", f"prepare.sizes={SIZES}",
                                      "--set", "prepare.queries_per_image={train: 4}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_the_camo_look_draws_the_plain_scenes_targets_and_queries_in_other_pixels(tmp_path):
    plain, camo = _prepare_look(tmp_path, "plain", "plain"), _prepare_look(tmp_path, "camo", "camo")
    for split in ("train", "val", "testA", "testB"):
        a, _ = read_manifest(plain / f"{split}.jsonl")
        b, _ = read_manifest(camo / f"{split}.jsonl")
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert (x.id, x.image, x.query, x.mask, x.bbox) == (y.id, y.image, y.query, y.mask, y.bbox)
            assert y.meta == {**x.meta, "look": "camo"} and "look" not in x.meta
        images = sorted({r.image for r in a})
        for rel in images:  # every image redrawn, none the same
            assert (plain / rel).read_bytes() != (camo / rel).read_bytes()
    # byte-identical across runs, and the plain look is what `prepare synthetic` always wrote
    assert _digest(_prepare_look(tmp_path, "camo2", "camo")) == _digest(camo)
    assert _digest(_prepare(tmp_path, "default")) != _digest(camo)
    plain_default = _prepare(tmp_path, "plain_default")
    assert (plain_default / "val.jsonl").read_bytes() == (plain / "val.jsonl").read_bytes()


def test_a_camo_shape_blends_into_its_surroundings():
    """In the plain look a shape's colour stands out from the grey around it; in the camo look its
    surroundings hold the same colour (the texture's blotches), and its edge has no crisp step."""
    from PIL import Image, ImageFilter

    from grto_cli.core.data.synthetic import COLORS, render_camo, visible_masks

    shapes = [Shape("square", "red", 20, 20, 8), Shape("circle", "blue", 44, 40, 9), Shape("triangle", "red", 44, 14, 7)]
    plain, masks = render_scene(shapes, 64, 200)
    camo = render_camo(shapes, 64, 200, np.random.default_rng(3)).astype(np.float32)
    assert all(np.array_equal(a, b) for a, b in zip(masks, visible_masks(shapes, 64)))
    inside = masks[0]
    ring = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))) > 0
    ring &= ~np.any(masks, axis=0)  # background pixels within 4 px of the red square

    def contrast(image):
        return float(np.abs(image[inside].mean(0) - image[ring].mean(0)).sum())
    assert contrast(camo) < 0.5 * contrast(plain.astype(np.float32))
    red = np.asarray(COLORS["red"], np.float32)
    near_red = np.linalg.norm(camo - red, axis=-1) < 80
    assert near_red[~np.any(masks, axis=0)].mean() > 0.05  # the named colour also lies outside the shapes
