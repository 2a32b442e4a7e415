"""Videos as evenly sampled frames, and MSR-VTT-style caption files.

A video is represented by ``n`` frames sampled evenly over its length (the
middle of each of ``n`` equal segments); a tower embeds each frame and the
clip's embedding is their mean (``pool_frames``). Decoding uses PyAV.

Example:
    >>> frames = sample_frames("clip.mp4", n=8)     # 8 PIL images
    >>> data = load_msrvtt_json("videos.json")      # videos with several captions each
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from graytune.data.tuxpaint import ImageCaptionSet
from graytune.errors import InvalidInputError, MissingDependencyError


def sample_frames(path: str | Path, n: int = 8) -> list[Image.Image]:
    """``n`` frames at the middles of ``n`` equal segments of the video (fewer frames: repeated)."""
    try:
        import av
    except ImportError as err:
        raise MissingDependencyError("decoding video needs PyAV: pip install av") from err
    if n < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    if not Path(path).is_file():
        raise MissingDependencyError(f"video file {path} is missing")
    with av.open(str(path)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise InvalidInputError(f"{path}: no video frames could be decoded")
    picks = [min(len(frames) - 1, int((i + 0.5) * len(frames) / n)) for i in range(n)]
    return [frames[i] for i in picks]


def load_msrvtt_json(path: str | Path) -> ImageCaptionSet:
    """MSR-VTT-style JSON: ``{"videos": [{"video_id", "path"}], "sentences": [{"video_id", "caption"}]}``.

    Video paths are relative to the JSON file. The returned set's ``images`` are video paths;
    tasks sample their frames.
    """
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        videos = {v["video_id"]: path.parent / v["path"] for v in spec["videos"]}
        sentences = [(s["video_id"], s["caption"]) for s in spec["sentences"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InvalidInputError(f"{path}: not an MSR-VTT-style caption file ({err!r}); expected "
                                '{"videos": [{"video_id", "path"}], "sentences": [{"video_id", "caption"}]}') from err
    ids = sorted(videos)
    index = {vid: i for i, vid in enumerate(ids)}
    unknown = sorted({vid for vid, _ in sentences if vid not in index})
    if unknown:
        raise InvalidInputError(f"{path}: captions name videos that are not listed: {unknown[:5]}")
    missing = [str(videos[v]) for v in ids if not videos[v].is_file()]
    if missing:
        raise MissingDependencyError(f"{path}: {len(missing)} video files are missing, e.g. {missing[0]}")
    return ImageCaptionSet(path.stem, tuple(videos[v] for v in ids), tuple(c for _, c in sentences),
                           tuple(index[v] for v, _ in sentences), tuple("" for _ in ids))
