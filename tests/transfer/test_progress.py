"""TransMiter's long phases show a bar with rate, ETA and loss on stderr, and write nothing to stdout."""

from __future__ import annotations

import torch

from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig
from graytune.transfer.transmiter import ExtractConfig, PlusConfig, TransMiter, class_scores


def small() -> TransMiter:
    torch.manual_seed(0)
    classes = ["cat", "dog", "car", "tree"] + [f"thing {i}" for i in range(12)]
    return TransMiter(TransMiterAdapter(TransMiterConfig(classes=16, dim=16)), classes, 4, "a {}")


def test_extract_and_plus_show_steps_loss_rate_and_eta_on_stderr_only(capfd) -> None:
    tm = small()
    weak = 10 * torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    tm.extract(weak, weak[:, :4] * 2, ExtractConfig(epochs=3, batch_size=8))
    out, err = capfd.readouterr()
    assert out == ""
    final = err.replace("\r", "\n").strip().splitlines()[-1]  # the bar's last state
    assert final.startswith("extract: 100%") and "15/15" in final  # 3 passes × 5 batches
    assert "step/s" in final and "<" in final and "loss=" in final  # rate, elapsed<remaining, the loss

    labels = torch.arange(40) % 4
    tm.finetune(weak, labels, weak, labels, PlusConfig(epochs=2, batch_size=10))
    out, err = capfd.readouterr()
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert out == "" and final.startswith("transmiter+: 100%") and "8/8" in final
    assert "loss=" in final and "val_acc=" in final and "best=" in final

    tm.extract(weak, weak[:, :4], ExtractConfig(epochs=1, batch_size=8), progress=False)
    assert capfd.readouterr() == ("", "")


class Encoder:
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)[:, :8]

    def encode_text(self, text: list[str]) -> torch.Tensor:
        return torch.randn(len(text), 8)


def test_scoring_counts_images_and_stays_quiet_by_default(capfd) -> None:
    pixels = torch.randn(300, 3, 4, 4)
    scores = class_scores(Encoder(), pixels, ["a", "b", "c"], "{}", batch_size=128, progress=True, desc="weak")
    out, err = capfd.readouterr()
    assert scores.shape == (300, 3) and out == ""
    assert "weak: 100%" in err and "300/300" in err and "img/s" in err
    class_scores(Encoder(), pixels, ["a", "b", "c"], "{}")
    assert capfd.readouterr() == ("", "")
