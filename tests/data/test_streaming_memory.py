"""Memory flat in data-set size: training on 5,000 images peaks within 100 MB of training on 500.

The images are the real Tux Paint drawings (symlinked under distinct names), at 128 px through a tiny CLIP
the test builds (a 5,000-image set preloaded at 128 px would hold ~1 GB of pixels).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graytune.data.tuxpaint import load_tuxpaint

RUN = """
import json, resource, sys
from graytune.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.fixture(scope="module")
def clip128(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    import torch
    from transformers import CLIPConfig, CLIPModel

    from tests.conftest import build_tiny_clip

    folder = build_tiny_clip(tmp_path_factory.mktemp("clip128"))
    config = CLIPModel.from_pretrained(folder).config.to_dict()
    config["vision_config"].update(image_size=128, patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**{k: config[k] for k in ("text_config", "vision_config", "projection_dim")})
              ).save_pretrained(folder)
    return folder


def drawings_csv(folder: Path, n: int) -> Path:
    data = load_tuxpaint()
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        j = i % len(data)
        link = folder / f"{i:05d}.png"
        link.symlink_to(data.images[j])
        rows.append(f"{link.name},\"{data.captions[j].replace(chr(34), '')}\"\n")
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(rows))
    return folder / "pairs.csv"


def peak_mb(backbone: str, csv: Path, out: Path) -> float:
    args = ["train", "--backbone", backbone, "--method", "output", "--data", str(csv), "--out", str(out),
            "--max-steps", "2", "--batch-size", "8", "--json"]
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result["peak_mb"]


def test_peak_memory_is_flat_in_data_set_size(clip128, tmp_path) -> None:  # type: ignore[no-untyped-def]
    backbone = f"hf-clip:{clip128}"
    small = peak_mb(backbone, drawings_csv(tmp_path / "small", 500), tmp_path / "out-small")
    large = peak_mb(backbone, drawings_csv(tmp_path / "large", 5000), tmp_path / "out-large")
    print(f"peak RSS: 500 images {small:.0f} MB, 5,000 images {large:.0f} MB")
    assert large - small < 100, (small, large)
