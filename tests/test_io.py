"""Atomic writes leave outputs with the permissions a plain write would give them."""

import os
import stat

import pytest

from grto_cli.core.io import atomic_dir, write_json


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "metrics.json", {"giou": 1.0})
        with atomic_dir(tmp_path / "bundle") as tmp:
            write_json(tmp / "grto.yaml", {})
            (tmp / "policy").mkdir()
        with open(tmp_path / "plain.json", "w"):
            pass
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "metrics.json") == _mode(tmp_path / "plain.json") == 0o666 & ~umask
    assert _mode(tmp_path / "bundle/grto.yaml") == 0o666 & ~umask
    assert _mode(tmp_path / "bundle") == _mode(tmp_path / "plain_dir") == 0o777 & ~umask
    assert _mode(tmp_path / "bundle/policy") == 0o777 & ~umask
