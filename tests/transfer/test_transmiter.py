"""TransMiter: Procrustes, identity at init, forward-only transfer, extraction, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import graytune
from graytune import ArtifactError, InvalidInputError
from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig
from graytune.transfer.classes import expand_classes
from graytune.transfer.procrustes import orthogonal_procrustes
from graytune.transfer.transmiter import ExtractConfig, PlusConfig, TransMiter, load_transmiter, save_transmiter

VOCAB = [f"thing {i}" for i in range(100)]


def small(total: int = 24, seed: int = 0) -> TransMiter:
    torch.manual_seed(seed)
    classes = expand_classes(["cat", "dog", "car", "tree"], total, seed, vocabulary=VOCAB)
    return TransMiter(TransMiterAdapter(TransMiterConfig(classes=total, dim=total)), classes, 4, "a {}")


def test_procrustes_matches_scipy_and_is_orthogonal() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    ours = orthogonal_procrustes(a, b, beta=0.0)
    ref, _ = scipy.linalg.orthogonal_procrustes(a.numpy(), b.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(ours @ ours.T, torch.eye(8, dtype=torch.float64))
    strong = orthogonal_procrustes(a, b, beta=1e9)  # a huge pull towards the identity
    torch.testing.assert_close(strong, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


def test_adapter_is_orthogonal_and_the_identity_at_init() -> None:
    tm = small()
    w = tm.adapter.weight
    torch.testing.assert_close(w @ w.T, torch.eye(24), atol=1e-5, rtol=0)
    scores = 20 * torch.randn(7, 24) + 3
    torch.testing.assert_close(tm.adapter(scores), scores, atol=1e-4, rtol=1e-5)
    with pytest.raises(InvalidInputError, match=r"expected scores of shape \[B, 24\]"):
        tm.adapter(torch.zeros(2, 10))


def trained(tm: TransMiter) -> TransMiter:
    with torch.no_grad():
        for p in tm.adapter.mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return tm


def test_transfer_recovers_a_known_basis_change() -> None:
    """Strong scores = weak scores with classes permuted: the moved adapter must commute with that."""
    tm = trained(small())
    g = torch.Generator().manual_seed(1)
    weak = 10 * torch.randn(200, 24, generator=g)
    perm = torch.randperm(24, generator=g)
    moved = tm.transfer(weak, weak[:, perm], beta=0.0)
    with torch.no_grad():
        expected = tm.adapter.eval()(weak)[:, perm]
        torch.testing.assert_close(moved.adapter(weak[:, perm]), expected, atol=1e-3, rtol=1e-3)
    w = moved.adapter.weight
    torch.testing.assert_close(w @ w.T, torch.eye(24), atol=1e-4, rtol=0)


def test_extraction_distils_the_teacher_without_labels() -> None:
    tm = small()
    g = torch.Generator().manual_seed(2)
    weak = 5 * torch.randn(512, 24, generator=g)
    teacher = weak[:, :4] + torch.tensor([0.0, 0.0, 0.0, 8.0])  # the fine-tuned model favours class 3
    before = (tm.adapt(weak).argmax(-1) == teacher.argmax(-1)).float().mean()
    history = tm.extract(weak, teacher, ExtractConfig(epochs=15, batch_size=64, lr=3e-3))
    after = (tm.adapt(weak).argmax(-1) == teacher.argmax(-1)).float().mean()
    assert history[-1] < history[0] and after > before + 0.2
    with pytest.raises(InvalidInputError, match=r"teacher scores must be \[512, 4\]"):
        tm.extract(weak, teacher[:, :3])


def test_plus_selects_on_validation_and_improves_accuracy() -> None:
    tm = small()
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (300,), generator=g)
    scores = 3 * torch.randn(300, 24, generator=g)
    scores[torch.arange(300), (labels + 1) % 4] += 6  # zero-shot confuses each class with the next one
    before = tm.accuracy(scores[200:], labels[200:])
    best = tm.finetune(scores[:150], labels[:150], scores[150:200], labels[150:200],
                       PlusConfig(lr=3e-3, epochs=15, batch_size=32))
    assert best["val_accuracy"] >= tm.accuracy(scores[150:200], labels[150:200]) - 1e-6
    assert tm.accuracy(scores[200:], labels[200:]) > before + 0.30


def test_scores_need_only_black_box_and_no_vjp(tiny_clip_dir) -> None:
    weak = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", access="black-box")
    strong = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", access="black-box")
    tm = small(total=12)
    pixels = torch.randn(16, 3, 32, 32)
    s_weak, s_strong = tm.scores(weak, pixels), tm.scores(strong, pixels)
    assert s_weak.shape == (16, 12) and float(s_weak.abs().max()) <= 100.0 + 1e-4
    tm.extract(s_weak, s_weak[:, :4] * 1.5, ExtractConfig(epochs=1, batch_size=8))
    moved = tm.transfer(s_weak, s_strong)
    assert moved.predict(strong, pixels).shape == (16, 4)
    assert weak.exposure.gradient_queries == strong.exposure.gradient_queries == 0


def test_save_load_round_trip_and_class_list_mismatch(tmp_path) -> None:
    tm = trained(small())
    scores = 10 * torch.randn(5, 24)
    folder = save_transmiter(tm, tmp_path / "tm", backbone="b", fingerprint="f" * 64)
    loaded, config = load_transmiter(folder, classes=tm.classes)
    assert config["classes"] == tm.classes and config["n_task"] == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter(scores), tm.adapter.eval()(scores))
    swapped = [tm.classes[1], tm.classes[0], *tm.classes[2:]]
    with pytest.raises(ArtifactError, match="class list mismatch.*first differ at position 0"):
        load_transmiter(folder, classes=swapped)


def test_class_expansion_is_seeded_and_excludes_task_names() -> None:
    a = expand_classes(["cat", "thing 3"], 10, seed=0, vocabulary=VOCAB)
    assert a[:2] == ["cat", "thing 3"] and "thing 3" not in a[2:] and len(set(a)) == 10
    assert a == expand_classes(["cat", "thing 3"], 10, seed=0, vocabulary=VOCAB)
    assert a != expand_classes(["cat", "thing 3"], 10, seed=1, vocabulary=VOCAB)
    wordnet = expand_classes(["T-shirt/top"], 1024)  # WordNet's concrete nouns by default
    assert len(wordnet) == len(set(wordnet)) == 1024 and wordnet[0] == "T-shirt/top"
    with pytest.raises(InvalidInputError, match="cannot make 500 classes"):
        expand_classes(["cat"], 500, vocabulary=VOCAB)


def test_create_leaves_the_global_random_state_alone() -> None:
    from graytune.transfer.transmiter import TransMiter

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = TransMiter.create(["cat", "dog"], total=8, seed=4)
    assert torch.equal(torch.rand(3), expected)  # create drew nothing from torch's global generator
    b = TransMiter.create(["cat", "dog"], total=8, seed=4, generator=torch.Generator().manual_seed(4))
    c = TransMiter.create(["cat", "dog"], total=8, seed=4, generator=torch.Generator().manual_seed(5))
    state = {k: v for k, v in a.adapter.state_dict().items()}
    assert all(torch.equal(v, b.adapter.state_dict()[k]) for k, v in state.items())
    assert any(not torch.equal(v, c.adapter.state_dict()[k]) for k, v in state.items())
