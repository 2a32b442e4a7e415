"""TransMiter's protocol options: base-only pool, noise per batch, β per sample, TransMiter+ steps, EFT."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune import InvalidInputError
from graytune.transfer.eft import eft_predict, eft_scores
from graytune.recipes.transmiter import base_items, load_queries
from graytune.transfer.transmiter import ExtractConfig, PlusConfig, TransMiter, procrustes_beta
from tests.backbones.tiny_text_vision import build_tiny_bert
from tests.transfer.test_text_queries import tiny_texts
from tests.transfer.test_transmiter import small, trained


def test_base_only_pool_excludes_the_novel_classes_items(tmp_path) -> None:  # type: ignore[no-untyped-def]
    weak = graytune.open_backbone(f"hf-text:{build_tiny_bert(tmp_path / 'bert')}", access="black-box")
    whole = tiny_texts()  # train: 30 texts of classes 0, 1, 2
    b2n = replace(whole, classes=(0, 1), eval_splits={"base": (0, 1), "novel": (2,)})
    pool = whole.train  # a pool of every class, novel included
    base = [t for t, y in zip(pool.texts, pool.labels.tolist()) if y in (0, 1)]

    assert load_queries(b2n, weak, unlabeled=pool).unlabeled == list(pool.texts)  # default: today's, transductive
    kept = load_queries(b2n, weak, unlabeled=pool, base_only=True).unlabeled
    assert kept == base and len(kept) == 20
    assert set(base_items(pool, b2n).labels.tolist()) == {0, 1}
    with pytest.raises(InvalidInputError, match="base-only unlabeled pool needs a base-to-novel set"):
        load_queries(whole, weak, unlabeled=pool, base_only=True)


def noisy_rows(noise_per: str, batch_size: int = 16) -> list[list[bool]]:
    """Per batch of one extraction, which rows reached the adapter with noise added."""
    tm = small()
    g = torch.Generator().manual_seed(3)
    weak = 5 * torch.randn(160, 24, generator=g)
    seen: list[list[bool]] = []
    adapt = tm.adapt

    def spy(z: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(z.double(), weak.double()).min(dim=1).values  # 0: an unchanged row
        seen.append((distance > 1e-6).tolist())
        return adapt(z)

    tm.adapt = spy  # type: ignore[method-assign]
    tm.extract(weak, weak[:, :4], ExtractConfig(epochs=3, batch_size=batch_size, noise_per=noise_per), progress=False)
    return seen


def test_noise_per_batch_flips_one_coin_per_batch() -> None:
    batches = noisy_rows("batch")
    assert len(batches) == 30  # 160 / 16 × 3 epochs
    assert all(all(b) or not any(b) for b in batches)  # the whole batch noised, or none of it
    assert any(all(b) for b in batches) and any(not any(b) for b in batches)  # and both happen (p = 0.5)
    per_sample = noisy_rows("sample")
    assert any(any(b) and not all(b) for b in per_sample)  # the old mode mixes noisy and clean rows in a batch
    assert ExtractConfig().noise_per == "batch"  # the authors' default
    with pytest.raises(InvalidInputError, match="noise_per must be one of batch, sample; got 'row'"):
        ExtractConfig(noise_per="row")


def test_beta_per_sample_scales_with_n_and_a_fixed_beta_does_not() -> None:
    tm = trained(small())
    g = torch.Generator().manual_seed(4)
    weak = 10 * torch.randn(40, 24, generator=g)
    strong = weak @ torch.linalg.qr(torch.randn(24, 24, generator=g))[0] + torch.randn(40, 24, generator=g)
    twice_weak, twice_strong = weak.repeat(3, 1), strong.repeat(3, 1)  # the same queries, N × 3

    def weight(moved: TransMiter) -> torch.Tensor:
        return moved.adapter.weight.detach()

    # β per sample: three copies of the pool change nothing (data term and β both grow × 3) ...
    per = [weight(tm.transfer(w, s, beta_per_sample=2.0)) for w, s in ((weak, strong), (twice_weak, twice_strong))]
    torch.testing.assert_close(per[0], per[1], atol=1e-5, rtol=0)
    # ... and it is the fixed β of that N
    torch.testing.assert_close(per[0], weight(tm.transfer(weak, strong, beta=80.0)), atol=1e-6, rtol=0)
    # a fixed β weighs a third as much against three copies: the solution moves, to the one of β / 3
    fixed = [weight(tm.transfer(w, s, beta=300.0)) for w, s in ((weak, strong), (twice_weak, twice_strong))]
    assert (fixed[0] - fixed[1]).abs().max() > 1e-3
    torch.testing.assert_close(fixed[1], weight(tm.transfer(weak, strong, beta=100.0)), atol=1e-5, rtol=0)
    # two per-sample values give two solutions
    assert (per[0] - weight(tm.transfer(weak, strong, beta_per_sample=50.0))).abs().max() > 1e-3
    assert procrustes_beta(800, per_sample=0.625) == 500.0 and procrustes_beta(800, 7.0) == 7.0
    with pytest.raises(InvalidInputError, match="beta_per_sample must be >= 0; got -1"):
        tm.transfer(weak, strong, beta_per_sample=-1.0)


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the optimizer steps of TransMiter's optimisers from now on."""
    import graytune.transfer.transmiter as module

    counted = [0]
    make = module.adamw_warmup_cosine

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        opt, sched = make(*args, **kwargs)
        opt.register_step_post_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
        return opt, sched

    monkeypatch.setattr(module, "adamw_warmup_cosine", counting)
    return counted


@pytest.mark.parametrize(("n", "max_steps"), [(80, 37), (300, 7)])
def test_plus_runs_exactly_the_stated_optimizer_steps(monkeypatch, n: int, max_steps: int) -> None:
    counted = count_steps(monkeypatch)
    tm = small()
    g = torch.Generator().manual_seed(5)
    scores, labels = 5 * torch.randn(n, 24, generator=g), torch.randint(0, 4, (n,), generator=g)
    best = tm.finetune(scores, labels, scores[:20], labels[:20], PlusConfig(batch_size=128, max_steps=max_steps),
                       progress=False)
    assert counted[0] == max_steps and best["steps"] == max_steps  # 80 labels at batch 128: not 20 steps in all
    counted[0] = 0
    best = tm.finetune(scores, labels, scores[:20], labels[:20], PlusConfig(batch_size=128, epochs=20),
                       progress=False)
    assert counted[0] == best["steps"] == 20 * -(-n // 128)  # epochs: ⌈n / batch⌉ steps per pass


class Linear:
    """A stand-in encoder: images and texts through fixed random maps (text: a hash of each string)."""

    def __init__(self, seed: int, dim: int = 6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image_map, self.words = torch.randn(3 * 4 * 4, dim, generator=g), torch.randn(64, dim, generator=g)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1) @ self.image_map

    def encode_text(self, text: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.words[[ord(c) % 64 for c in t]].sum(0) for t in text])


def test_eft_is_strong_zero_shot_plus_the_weak_pairs_difference() -> None:
    strong, weak_ft, weak = Linear(0), Linear(1), Linear(2)
    names, prompt = ["cat", "dog", "car"], "a {}"

    def by_hand(encoder: Linear, queries) -> torch.Tensor:  # type: ignore[no-untyped-def]
        q = encoder.encode_image(queries) if isinstance(queries, torch.Tensor) else encoder.encode_text(queries)
        c = encoder.encode_text([prompt.format(n) for n in names])
        return 100 * F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T

    for queries in (torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(6)),  # images
                    ["a small cat", "rain on the roof", "a car far away", "dogs"]):  # texts
        expected = by_hand(strong, queries) + by_hand(weak_ft, queries) - by_hand(weak, queries)
        got = eft_predict(strong, weak_ft, weak, queries, names, prompt, batch_size=2)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
        half = eft_predict(strong, weak_ft, weak, queries, names, prompt, alpha=0.5)  # type: ignore[arg-type]
        torch.testing.assert_close(half, by_hand(strong, queries) + 0.5 * (by_hand(weak_ft, queries)
                                                                           - by_hand(weak, queries)),
                                   atol=1e-4, rtol=1e-5)
    with pytest.raises(InvalidInputError, match=r"EFT needs three \[N, C\] scores.*got \[\[2, 3\], \[2, 3\], \[2, 4\]\]"):
        eft_scores(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


def test_cli_transfer_takes_beta_per_sample(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from graytune.cli.main import main

    fake = lambda name, *a, **k: tiny_texts()  # noqa: E731
    monkeypatch.setattr("graytune.recipes.run.load_splits", fake)
    monkeypatch.setattr("graytune.recipes.transmiter.load_splits", fake)
    weak = f"hf-text:{build_tiny_bert(tmp_path / 'bert')}"
    assert main(["train", "--backbone", weak, "--method", "output", "--data", "tiny-texts", "--out",
                 str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "4", "--json"]) == 0
    assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", "tiny-texts",
                 "--out", str(tmp_path / "tm"), "--classes", "16", "--json"]) == 0
    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", weak, "--data", "tiny-texts",
                 "--out", str(tmp_path / "moved"), "--beta-per-sample", "0.5", "--json"]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "moved" / "adapter_config.json").read_text())
    assert saved["beta"] == 15.0 and saved["beta_per_sample"] == 0.5 and saved["unlabeled"] == 30  # 0.5 × N
