"""``graytune serve`` refuses everyday mistakes before it prints its banner: Ray missing, a bad key file, a taken
port, a bad option; it warns about a key file others can read."""

from __future__ import annotations

import logging
import socket
import sys

import pytest
import torch

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


def _keys(folder, mode: int = 0o600):  # type: ignore[no-untyped-def]
    keys = folder / "keys.txt"
    keys.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    keys.chmod(mode)
    return keys


def test_a_taken_port_fails_before_the_banner(tmp_path, capsys) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "minilm", "--api-keys", str(_keys(tmp_path)), "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert "graytune serve:" not in out.out and "Traceback" not in out.err
    assert f"cannot listen on 127.0.0.1:{port}" in out.err and "--port" in out.err


def test_a_bad_read_fails_before_the_banner_and_frees_the_port(tmp_path, capsys) -> None:
    port = _free_port()
    argv = ["serve", "minilm", "--api-keys", str(_keys(tmp_path)), "--port", str(port), "--reads", "image.patch_embeds"]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "graytune serve:" not in out.out and "image.patch_embeds" in out.err
    socket.create_server(("127.0.0.1", port)).close()  # the port was let go


def test_the_banner_comes_once_started_and_names_the_resolved_device(tmp_path, capsys, monkeypatch) -> None:
    from graytune.serve import runner

    seen = {}

    def serve_forever(started, access_log=False):  # type: ignore[no-untyped-def]
        seen["banner_out"], seen["access_log"] = capsys.readouterr().out, access_log
        with pytest.raises(OSError):  # the port is bound by the time the banner is printed
            socket.create_server(("127.0.0.1", started.sock.getsockname()[1])).close()
        started.sock.close()

    monkeypatch.setattr(runner, "serve_forever", serve_forever)
    port = _free_port()
    assert main(["-v", "serve", "minilm", "--api-keys", str(_keys(tmp_path)), "--port", str(port)]) == 0
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # auto, resolved
    assert seen["banner_out"] == f"graytune serve: minilm at dark-gray on http://127.0.0.1:{port} ({device}, fp32)\n"
    assert seen["access_log"] is True  # -v: uvicorn's log of every request


def test_serve_help_says_how_to_get_the_request_log(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "graytune -v serve logs every request" in " ".join(capsys.readouterr().out.split())


def test_a_key_file_others_can_read_gets_a_warning(tmp_path, caplog) -> None:
    from graytune.serve.config import ApiKeys

    with caplog.at_level(logging.WARNING, logger="graytune.serve.config"):
        ApiKeys.load(_keys(tmp_path, 0o600))
        assert not caplog.records
        loose = _keys(tmp_path, 0o644)  # the same file, opened to others
        ApiKeys.load(loose)
    [record] = caplog.records
    assert str(loose) in record.getMessage() and "mode 0644" in record.getMessage()
    assert f"chmod 600 {loose}" in record.getMessage()


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])
