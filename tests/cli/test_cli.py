"""The command line: info shows specs (never weights), errors exit 2 with a suggestion, demo prints a table."""

from __future__ import annotations

import json

from graytune.cli.main import main


def test_info_prints_ports_for_the_level(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "efficientnet-lite0", "--access", "dark-gray"]) == 0
    out = capsys.readouterr().out
    assert "image.pixels" in out and "[B, 1000]" in out and "fingerprint" in out
    assert "image.layer." not in out  # entry ports need light-gray
    assert main(["info", "efficientnet-lite0", "--access", "light-gray"]) == 0
    assert "image.layer." in capsys.readouterr().out


def test_info_json_is_the_spec_and_holds_no_weights(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "minilm", "--json"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert data["access"] == "dark-gray" and data["id"] == "minilm"
    assert {p["name"] for p in data["ports"]} >= {"text.token_embeds", "text.embeds"}
    assert len(text) < 20_000  # plain data: names, shapes, preprocessing; no tensors


def test_unknown_backbone_exits_2_with_suggestion(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "efficientnet-lite3"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'efficientnet-lite3'" in err and "did you mean" in err and "Traceback" not in err


def test_demo_prints_a_retrieval_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--limit", "48", "--image-size", "96"]) == 0
    out = capsys.readouterr().out
    assert "image → text" in out and "text → image" in out and "not contrastively trained" in out
    row = next(line for line in out.splitlines() if line.startswith("image → text")).split()
    r1, r5, r10 = (float(v) for v in row[3:6])
    assert 0 <= r1 <= r5 <= r10 <= 100 and r10 > 100 * 10 / 48  # better than chance on 48 pairs
