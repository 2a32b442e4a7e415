"""Access levels and specs are ordered, plain data, and serialise to JSON."""

from __future__ import annotations

import json

import pytest

from graytune import AccessLevel, BackboneSpec, Op, PortKind, PortSpec, UnknownNameError
from graytune.registry import Registry
from graytune.types import required_level


def make_spec() -> BackboneSpec:
    ports = (PortSpec("image.pixels", PortKind.INPUT, ("B", 3, "H", "W"), "float32", (Op.REPLACE,), "image"),
             PortSpec("image.layer.2", PortKind.ENTRY, ("B", 16, "H/4", "W/4"), "float32", (Op.ADD,), "image"),
             PortSpec("image.embeds", PortKind.OUTPUT, ("B", 8), "float32", (Op.READ,), "image"))
    return BackboneSpec("toy", ("image",), ports, {"image": {"image_size": 64}}, "a toy").with_fingerprint("w1")


def test_levels_are_ordered_and_parse_from_labels() -> None:
    assert AccessLevel.BLACK_BOX < AccessLevel.DARK_GRAY < AccessLevel.LIGHT_GRAY < AccessLevel.WHITE_BOX
    assert AccessLevel.parse("dark-gray") is AccessLevel.DARK_GRAY
    assert AccessLevel.parse("LIGHT_GRAY") is AccessLevel.LIGHT_GRAY
    assert str(AccessLevel.WHITE_BOX) == "white-box"
    with pytest.raises(UnknownNameError, match="did you mean 'dark-gray'"):
        AccessLevel.parse("dark-grey")


def test_required_levels_follow_the_contract() -> None:
    assert required_level(PortKind.INPUT, Op.REPLACE, with_grad=False) is AccessLevel.BLACK_BOX
    assert required_level(PortKind.INPUT, Op.REPLACE, with_grad=True) is AccessLevel.DARK_GRAY
    assert required_level(PortKind.INPUT, Op.ADD, with_grad=False) is AccessLevel.BLACK_BOX  # zeroth-order tuning
    assert required_level(PortKind.INPUT, Op.INSERT, with_grad=True) is AccessLevel.DARK_GRAY
    assert required_level(PortKind.INPUT, Op.READ, with_grad=False) is AccessLevel.DARK_GRAY  # and a grant
    assert required_level(PortKind.ENTRY, Op.ADD, with_grad=False) is AccessLevel.LIGHT_GRAY
    assert required_level(PortKind.ENTRY, Op.INSERT, with_grad=True) is AccessLevel.LIGHT_GRAY
    assert required_level(PortKind.OUTPUT, Op.READ, with_grad=False) is AccessLevel.BLACK_BOX


def test_spec_round_trips_through_json() -> None:
    spec = make_spec()
    text = spec.to_json()
    assert json.loads(text)["ports"][1]["shape"] == ["B", 16, "H/4", "W/4"]
    assert BackboneSpec.from_json(text) == spec


def test_fingerprint_depends_on_spec_and_weights() -> None:
    spec = make_spec()
    assert len(spec.fingerprint) == 64
    assert spec.with_fingerprint("w1").fingerprint == spec.fingerprint
    assert spec.with_fingerprint("w2").fingerprint != spec.fingerprint
    other = BackboneSpec("toy", ("image",), spec.ports[:1], spec.preprocess, "a toy").with_fingerprint("w1")
    assert other.fingerprint != spec.fingerprint


def test_visible_spec_hides_entries_below_light_gray() -> None:
    spec = make_spec()
    assert spec.visible_at(AccessLevel.DARK_GRAY).port_names() == ["image.pixels", "image.embeds"]
    assert "image.layer.2" in spec.visible_at(AccessLevel.LIGHT_GRAY).port_names()


def test_unknown_port_suggests_names() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'image.embeds'"):
        make_spec().port("image.embed")


def test_registry_exact_family_and_unknown() -> None:
    reg: Registry = Registry("widget")
    reg.register("alpha")(lambda: "a")
    reg.register("fam:", family_help="path")(lambda arg: f"f={arg}")
    assert reg.lookup("alpha")[0]() == "a"
    builder, arg = reg.lookup("fam:/x")
    assert builder(arg) == "f=/x"
    assert reg.names() == ["alpha", "fam:<path>"]
    with pytest.raises(UnknownNameError, match="did you mean 'alpha'"):
        reg.lookup("alpah")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(lambda: None)


def test_field_docstrings_become_cli_help() -> None:
    from graytune.config import field_docs
    from graytune.train.trainer import TrainConfig

    docs = field_docs(TrainConfig)
    assert docs["lr"].startswith("Peak learning rate of AdamW;")
    assert set(docs) == {f for f in TrainConfig.__dataclass_fields__}


def test_descriptive_preprocess_fields_leave_the_fingerprint_alone() -> None:
    """Describing a backbone better (a new preprocess field) must not orphan adapters saved against it."""
    from dataclasses import replace

    import graytune

    spec = graytune.open_backbone("minilm").spec
    text = dict(spec.preprocess["text"])
    plain = {k: v for k, v in text.items() if k not in ("long_texts", "max_positions")}
    described = replace(spec, preprocess={"text": plain}).with_fingerprint("w")
    assert replace(spec, preprocess={"text": text}).with_fingerprint("w").fingerprint == described.fingerprint
    changed = replace(spec, preprocess={"text": {**plain, "max_tokens": 64}}).with_fingerprint("w")
    assert changed.fingerprint != described.fingerprint  # what a client sends still counts
