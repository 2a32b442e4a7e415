"""``graytune serve`` refuses everyday mistakes before it starts anything: Ray missing, a bad key file."""

from __future__ import annotations

import sys

from graytune.cli.main import main
from tests.serve.conftest import KEYS


def test_serve_ray_without_ray_names_the_install(tmp_path, monkeypatch, capsys) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as on a machine without it
    assert main(["serve", "minilm", "--api-keys", str(keys), "--ray", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'graytune[ray]'" in err and "Traceback" not in err


def test_a_bad_key_file_fails_before_the_banner(tmp_path, capsys) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alice short\n")
    assert main(["serve", "minilm", "--api-keys", str(keys)]) == 2
    out = capsys.readouterr()
    assert "shorter than 16" in out.err and "graytune serve:" not in out.out
