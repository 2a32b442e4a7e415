"""Fine-tuning jobs on images (issue 29 items 1 and 3): a zip of labelled images trains through the server, and
its model embeds base64 images at /v1/embeddings (graytune's extension) as the artifact does in process. The
backbone is a tiny random CLIP the test builds (mechanics only, never quality)."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import graytune
from graytune.artifacts import load_adapter, read_config
from graytune.data.images import ImagePreprocess
from graytune.recipes.jobs.routes import install_jobs
from tests.serve.conftest import ALICE
from tests.serve.test_jobs import wait

openai = pytest.importorskip("openai")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _png(colour: tuple[int, int, int], shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), tuple(min(255, c + shade) for c in colour)).save(out, format="PNG")
    return out.getvalue()


def _zip(rows: list[tuple[str, str]], images: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("set/labels.csv", "image,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
        for name, data in images.items():
            archive.writestr(f"set/{name}", data)
    return out.getvalue()


def test_an_image_job_embeds_images_as_its_artifact_does_in_process(serve, tiny_clip_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", "dark-gray")
    url, app = serve(handle=handle, access="dark-gray", reads=(), jobs=str(tmp_path / "jobs"), extra=install_jobs)
    alice = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    images = {f"{label}{i}.png": _png(colour, 3 * i) for label, colour in COLOURS.items() for i in range(12)}
    rows = [(name, name.rstrip("0123456789.png")) for name in images]
    upload = alice.files.create(file=("colours.zip", _zip(rows, images)), purpose="fine-tune")
    assert upload.graytune == {"task": "classification", "rows": 24, "classes": ["blue", "red"]}

    missing = _zip([*rows, ("green0.png", "green")], images)  # a row names an image the archive lacks
    with pytest.raises(openai.BadRequestError, match="green0.png") as bad:
        alice.files.create(file=("missing.zip", missing), purpose="fine-tune")
    assert str(tmp_path) not in str(bad.value)  # the server's paths stay on the server
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr("../outside.csv", "image,label\n")
    with pytest.raises(openai.BadRequestError, match="outside its folder"):
        alice.files.create(file=("escape.zip", escaping.getvalue()), purpose="fine-tune")
    assert not (tmp_path / "jobs" / "outside.csv").exists()

    job = alice.fine_tuning.jobs.create(model=handle.spec.id, training_file=upload.id, seed=2,
                                        hyperparameters={"max_steps": 3, "batch_size": 8})
    job = wait(alice, job.id)
    assert job.status == "succeeded", job.error

    asked = [_png(COLOURS["red"], 7), _png(COLOURS["blue"], 1)]
    items = [{"image": base64.b64encode(png).decode()} for png in asked]
    got = alice.embeddings.create(model=job.fine_tuned_model, input=items)  # type: ignore[arg-type]
    folder = app.state.jobs.store.folder(job.id) / "run"
    model, saved = load_adapter(str(folder), handle), read_config(str(folder))["preprocess"]
    pre = ImagePreprocess(saved["image_size"], saved["fit"], tuple(saved["mean"]), tuple(saved["std"]))
    with torch.no_grad():
        want = model.encode_image(pre([Image.open(io.BytesIO(png)) for png in asked]))
    assert torch.allclose(torch.tensor([d.embedding for d in got.data]), want, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="not a base64 PNG or JPEG"):
        alice.embeddings.create(model=job.fine_tuned_model, input=[{"image": "bm90IGFuIGltYWdl"}])  # type: ignore[list-item]
