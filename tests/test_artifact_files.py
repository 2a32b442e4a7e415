"""The artifact files on disk: written atomically, with the permissions the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from graytune.artifact_files import CONFIG_NAME, WEIGHTS_NAME, replace_atomically, write_artifact


def _mode(path) -> int:  # type: ignore[no-untyped-def]
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_artifact_files_honour_the_umask(tmp_path, umask) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(umask)
    try:
        folder = write_artifact(tmp_path / "a", {"method": "dga"}, {"w": torch.ones(2)})
        history = replace_atomically(tmp_path / "history.jsonl", lambda p: p.write_text("{}\n"))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask  # what open() gives a new file: 0644 under 022 (mkstemp gave 0600 whatever the umask)
    assert {_mode(folder / CONFIG_NAME), _mode(folder / WEIGHTS_NAME), _mode(history)} == {expected}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([CONFIG_NAME, WEIGHTS_NAME,
                                                                                 "history.jsonl"])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "adapter_config.json"
    target.write_text("old")

    def fail(path) -> None:  # type: ignore[no-untyped-def]
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]
