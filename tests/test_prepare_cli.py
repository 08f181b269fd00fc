"""`grto prepare` on real layouts through the CLI: clear errors, skip-and-count, --strict."""

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from grto_cli.cli import app
from test_readers_cod import make_cod10k

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _prepare(tmp_path, monkeypatch, *args):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, ["prepare", *args], catch_exceptions=False)


def test_missing_raw_data_prints_the_expected_layout(tmp_path, monkeypatch):
    r = _prepare(tmp_path, monkeypatch, "refcocog", "--raw", str(tmp_path / "no-such-dir"))
    assert r.exit_code == 2
    assert "refs(umd).p" in r.output and "instances.json" in r.output and "no-such-dir" in r.output
    assert not (tmp_path / "data/prepared/refcocog").exists()


def test_corrupt_image_is_skipped_and_counted_or_fails_under_strict(tmp_path, monkeypatch):
    make_cod10k(tmp_path / "raw")
    r = _prepare(tmp_path, monkeypatch, "cod10k", "--raw", str(tmp_path / "raw"))
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "data/prepared/cod10k/report.json").read_text())
    skipped = report["train"]["skipped_ids"]
    assert skipped["unreadable image"] == ["cod10k-train-COD10K-CAM-3-Flying-53-Bird-7"]
    assert report["train"]["kept"] == 2 and "unreadable image" in r.output

    shutil.rmtree(tmp_path / "data")
    r = _prepare(tmp_path, monkeypatch, "cod10k", "--raw", str(tmp_path / "raw"), "--strict")
    assert r.exit_code == 2
    assert "COD10K-CAM-3-Flying-53-Bird-7" in r.output and "--strict" in r.output
    assert not (tmp_path / "data/prepared/cod10k").exists()  # nothing half-written


def test_a_look_other_than_plain_is_for_synthetic_scenes_only(tmp_path, monkeypatch):
    r = _prepare(tmp_path, monkeypatch, "synthetic", "--look", "foggy")
    assert r.exit_code == 2 and "prepare.look 'foggy'" in r.output and "camo" in r.output
    make_cod10k(tmp_path / "raw")
    r = _prepare(tmp_path, monkeypatch, "cod10k", "--raw", str(tmp_path / "raw"), "--look", "camo")
    assert r.exit_code == 2 and "draws synthetic scenes" in r.output and "cod10k" in r.output
    assert not (tmp_path / "data/prepared").exists()
