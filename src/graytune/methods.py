"""The method registry: every adaptation method graytune knows, one entry each, data only.

An entry says which adapters go on which tower (or which white-box module
change, or which logit adapter), its kind and its default learning rate. Its
minimum access level, read grants, ports and options are *derived* from its
adapters' own declarations (``min_access``, ``port_patterns``, ``read_patterns``,
``config_class``), never written twice. The CLI's choices and help, train and
eval dispatch, ``compare``/``demo``, ``graytune methods`` and the tests' method
tables all read this table. Adding a method is one entry here plus, if its
adapter is new, one adapter file.

Example:
    >>> METHODS["dga"].min_access.label, METHODS["dga"].lr
    ('dark-gray', 0.003)
    >>> METHODS["dga-zo"].min_access.label, METHODS["dga-zo"].zeroth_order   # its input adapters ask no gradient
    ('black-box', True)
    >>> get_method("lora").resolve_options({"rank": "4"})["lora"]
    {'rank': 4}
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any

from graytune.adapters import ADAPTERS, LOGIT_ADAPTERS, WHITEBOX
from graytune.adapters.declared import port_name
from graytune.config import coerce_option, field_docs, type_name
from graytune.errors import InvalidInputError, UnknownNameError
from graytune.types import AccessLevel, BackboneSpec, require_level

log = logging.getLogger(__name__)


class MethodKind(str, Enum):
    """What a method trains."""

    TOWER = "tower adapters"  # adapters around the hidden towers, through the boundary
    WHITEBOX = "white-box module"  # the client's own copy of the module (baselines)
    LOGIT = "logit adapter"  # an adapter on class scores, forward only (TransMiter)


#: The kinds of backbone: CLIP-like encoders (embeddings out), causal language models (target log-probs out) and
#: text-to-image diffusion models (the UNet's prediction out).
BACKBONE_KINDS = ("encoder", "causal-lm", "diffusion")
#: per kind of backbone, the towers adapters go on when not every modality is one: a diffusion model's image side is
#: its owner-side VAE encode (forward only), so its adapters edit the prompt (as textual inversion's token does)
ADAPTED_MODALITIES = {"diffusion": ("text",)}


def backbone_kind(spec: BackboneSpec) -> str:
    """``causal-lm`` for a backbone whose output is ``text.target_logprobs``, ``diffusion`` for one whose output is
    ``unet.prediction``, ``encoder`` otherwise."""
    names = spec.port_names()
    if "text.target_logprobs" in names:
        return "causal-lm"
    return "diffusion" if "unet.prediction" in names else "encoder"


@dataclass(frozen=True)
class Recipe:
    """How a kind of method is made: the one table every program reads instead of comparing names."""

    name: str
    by_train: bool
    """``graytune train`` makes it."""
    fits: bool
    """The training loop (``graytune.train.loop.fit``) runs it or it trains nothing: the data-parallel entry
    point, ``--max-calls`` and the studies' ``run_once`` take it."""
    takes_shots: bool = False
    """It trains on a few labels per class (``--shots``)."""


#: ``fit``: the gradient trainer; ``none``: nothing to train; ``plus``: TransMiter+ from a transferred artifact;
#: ``extract``: ``graytune extract`` then ``transfer``.
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fit", by_train=True, fits=True), Recipe("none", by_train=True, fits=True),
    Recipe("plus", by_train=True, fits=False, takes_shots=True), Recipe("extract", by_train=False, fits=False),
]}


@dataclass(frozen=True)
class Slot:
    """One adapter on one tower (``modality``), or the method's white-box / logit adapter (no modality)."""

    adapter: str
    modality: str = ""
    if_port: bool = False
    """Built only where the tower publishes the adapter's ports (AdaLink on image towers with patch
    tokens), left out elsewhere; otherwise a tower without them is an error."""


@dataclass(frozen=True)
class OptionField:
    """One option of a method: an adapter config field, for ``--option KEY=VALUE`` and ``graytune methods``."""

    adapter: str
    name: str
    type: str
    default: Any
    doc: str

    @property
    def qualified(self) -> str:
        return f"{self.adapter}.{self.name}"

    def to_dict(self) -> dict[str, Any]:
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        return {"key": self.name, "adapter": self.adapter, "type": self.type, "default": default, "doc": self.doc}


@dataclass(frozen=True)
class Method:
    """One adaptation method (see the module docstring)."""

    name: str
    kind: MethodKind
    doc: str
    lr: float | None
    """Default peak learning rate (the one ``docs/results.md`` uses); None when nothing trains."""
    slots: tuple[Slot, ...] = ()
    recipe: str = "fit"
    """How it is made: ``fit`` (the gradient trainer), ``plus`` (TransMiter+ from a transferred artifact),
    ``extract`` (``graytune extract`` then ``transfer``), ``none`` (nothing to train)."""
    trained_by: str = "graytune train"
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per adapter, this method's own option defaults where they differ from the adapter's."""
    shown_in: tuple[str, ...] = ()
    """The tables that show it: ``demo`` (``make demo``, the README's table), ``bench`` (``graytune bench``)."""
    backbones: tuple[str, ...] = ("encoder",)
    """The kinds of backbone it adapts (``BACKBONE_KINDS``): output adapters need an embedding, which a
    language model does not publish; its output is ``text.target_logprobs``."""

    @property
    def made_by(self) -> Recipe:
        """How it is made (``RECIPES``)."""
        return RECIPES[self.recipe]

    def adapter_class(self, slot: Slot) -> Any:
        table = {MethodKind.TOWER: ADAPTERS, MethodKind.WHITEBOX: WHITEBOX, MethodKind.LOGIT: LOGIT_ADAPTERS}
        return table[self.kind].lookup(slot.adapter)[0]

    @property
    def adapter_names(self) -> list[str]:
        """Each adapter once, in slot order."""
        return list(dict.fromkeys(s.adapter for s in self.slots))

    def trains_zeroth_order(self, slot: Slot) -> bool:
        """Whether this method trains ``slot``'s adapter from forward calls alone (its ``zeroth_order`` option)."""
        return bool(self.defaults.get(slot.adapter, {}).get("zeroth_order")) and \
            self.adapter_class(slot).zo_access is not None

    @property
    def zeroth_order(self) -> bool:
        """Whether some adapter trains zeroth-order (``graytune train --zo`` picks the estimator)."""
        return any(self.trains_zeroth_order(s) for s in self.slots)

    @property
    def min_access(self) -> AccessLevel:
        """The lowest level at which every adapter of this method works (black-box with none).

        An adapter trained zeroth-order needs only its ``zo_access``: it asks the boundary for no gradient.
        """
        return max((self.adapter_class(s).zo_access if self.trains_zeroth_order(s) else self.adapter_class(s).min_access
                    for s in self.slots), default=AccessLevel.BLACK_BOX)

    @property
    def reads(self) -> tuple[str, ...]:
        """Ports whose values the owner must let the client read (explicit grants), on any backbone."""
        return self._reads(self.slots)

    def reads_on(self, spec: BackboneSpec) -> tuple[str, ...]:
        """The reads this method needs on the backbone ``spec`` describes (what ``open_for`` grants)."""
        return self._reads(self.slots_on(spec))

    def _reads(self, slots: tuple[Slot, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(port_name(p, s.modality) for s in slots
                                   for p in self.adapter_class(s).read_patterns))

    @property
    def ports(self) -> tuple[str, ...]:
        """Ports the method touches (``image.layer.*``: some of the declared entry layers)."""
        return tuple(dict.fromkeys(port_name(p, s.modality) for s in self.slots
                                   for p in self.adapter_class(s).port_patterns))

    def slots_on(self, spec: BackboneSpec) -> tuple[Slot, ...]:
        """The slots built on ``spec``'s backbone: towers it has, and ``if_port`` slots where their ports are."""
        names = set(spec.port_names())
        towers = ADAPTED_MODALITIES.get(backbone_kind(spec), spec.modalities)
        kept = []
        for s in self.slots:
            if s.modality and (s.modality not in spec.modalities or s.modality not in towers):
                continue
            missing = [port_name(p, s.modality) for p in self.adapter_class(s).port_patterns
                       if "*" not in p and port_name(p, s.modality) not in names]
            if s.if_port and missing:
                log.info("%s: %s publishes no %s, so its %s %s is left out", self.name, spec.id,
                         ", ".join(missing), s.modality, s.adapter)
                continue
            kept.append(s)
        return tuple(kept)

    @property
    def trains(self) -> str:
        if not self.slots:
            return "nothing"
        parts: dict[str, list[str]] = {}
        for s in self.slots:
            parts.setdefault(s.adapter, []).append(s.modality)
        return "; ".join(f"{self.adapter_class(Slot(a)).trains}" + (f" ({', '.join(m)})" if any(m) else "")
                         + (", zeroth-order" if self.trains_zeroth_order(Slot(a)) else "")
                         for a, m in parts.items())

    def options(self) -> list[OptionField]:
        """Every option of every adapter of this method, with this method's defaults."""
        out = []
        for name in self.adapter_names:
            config_class = self.adapter_class(Slot(name)).config_class
            docs = field_docs(config_class)
            for f in fields(config_class):
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                default = self.defaults.get(name, {}).get(f.name, default)
                out.append(OptionField(name, f.name, type_name(f.type), default, docs.get(f.name, "")))
        return out

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per adapter, the options ``given`` sets (``key`` or ``adapter.key``), typed; every error at once.

        Raises:
            InvalidInputError: unknown or ambiguous keys (listing the allowed keys with their types and
                defaults), or values of the wrong type.
        """
        known = self.options()
        resolved: dict[str, dict[str, Any]] = {name: dict(self.defaults.get(name, {})) for name in self.adapter_names}
        errors = []
        for key, value in given.items():
            matches = [o for o in known if key in (o.name, o.qualified)]
            if len(matches) > 1 and "." not in key:
                errors.append(f"{key!r} is an option of several adapters; write one of "
                              f"{', '.join(o.qualified for o in matches)}")
                continue
            if not matches:
                close = difflib.get_close_matches(key, [o.name for o in known], n=1)
                errors.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                continue
            try:
                resolved[matches[0].adapter][matches[0].name] = coerce_option(key, matches[0].type, value)
            except InvalidInputError as err:
                errors.append(str(err))
        if errors:
            allowed = ", ".join(f"{o.name} ({o.type}, default {o.default!r})" for o in known) or "none"
            raise InvalidInputError(f"method {self.name!r}: " + "; ".join(errors) + f". Its options: {allowed}")
        return {name: opts for name, opts in resolved.items() if opts}

    def check_backbone(self, spec: BackboneSpec) -> None:
        """``InvalidInputError`` when this method does not adapt ``spec``'s kind of backbone, naming those that do."""
        kind = backbone_kind(spec)
        if kind not in self.backbones:
            fitting = [name for name, m in METHODS.items() if kind in m.backbones]
            raise InvalidInputError(f"method {self.name!r} adapts {' and '.join(k + 's' for k in self.backbones)}; "
                                    f"{spec.id} is a {kind}, whose methods are {', '.join(fitting)} "
                                    "(graytune methods shows which method fits which backbone)")

    def check_access(self, granted: AccessLevel) -> None:
        """``AccessDeniedError`` when ``granted`` is below this method's level (the one level check)."""
        require_level(granted, self.min_access, f"method {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The row ``graytune methods --json`` prints."""
        return {"name": self.name, "kind": self.kind.value, "access": self.min_access.label,
                "reads": list(self.reads), "ports": list(self.ports), "lr": self.lr, "trains": self.trains,
                "recipe": self.recipe, "trained_by": self.trained_by, "doc": self.doc,
                "zeroth_order": self.zeroth_order, "backbones": list(self.backbones),
                "adapters": [{"adapter": s.adapter, "modality": s.modality or None} for s in self.slots],
                "options": [o.to_dict() for o in self.options()]}


def _both(adapter: str, if_port: bool = False) -> tuple[Slot, ...]:
    return Slot(adapter, "image", if_port), Slot(adapter, "text", if_port)


_DGA_INPUTS = (Slot("dga-pixel", "image"), Slot("dga-text", "text"))
_TOWER, _WHITE, _LOGIT = MethodKind.TOWER, MethodKind.WHITEBOX, MethodKind.LOGIT
_ZO = {"zeroth_order": True}
_BOTH = ("demo", "bench")
_ALL = BACKBONE_KINDS
_GATED = {"gate": "scalar"}
_ZO_TRAIN = ("graytune train (zeroth-order: --zo spsa|spsa-gc|zip|mezo, --zo-q, --zo-eps): spsa (Rademacher "
             "directions, fixed eps); spsa-gc (BlackVIP's gradient correction, the default; BlackVIP draws "
             "segmented-uniform directions and decays eps, graytune does not); zip (ZIP's low-rank, feature-shared "
             "reparametrisation: rank 5, intrinsic dimension --zo-dim 500, Fastfood projections, segmented-uniform "
             "directions, eps/t^0.1, sqrt(n) clipping; every zeroth-order tensor is reparametrised, ZIP's only the "
             "prompt); mezo (MeZO's Gaussian two-point). Every estimate is stepped by AdamW with warm-up and cosine, "
             "not the papers' SGD gains. --max-calls caps the training forward calls, one per tower forward: twice "
             "ZIP's and BlackVIP's count, one per model evaluation (both towers); runs report both")

#: Every method, by name. Adapters on towers a backbone lacks are skipped when a model is built.
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("zero-shot", _TOWER, "the frozen backbone, no adapter", None, recipe="none",
           trained_by="nothing to train", shown_in=_BOTH, backbones=_ALL),
    Method("output", _TOWER, "DGA output adapters: a residual linear map per tower's embedding", 1e-3,
           _both("dga-output"), shown_in=_BOTH),
    Method("output-mlp", _TOWER, "CLIP-Adapter-style residual MLP on each tower's embedding", 1e-3,
           _both("output-mlp")),
    Method("dga", _TOWER, "dark-gray DGA: pixel conv, text shift + extra token, and output adapters (on a language "
           "model: the shift and extra token; on a diffusion model: the prompt's shift and extra token, textual "
           "inversion's shape)", 3e-3, (*_DGA_INPUTS, *_both("dga-output", if_port=True)),
           shown_in=_BOTH, backbones=_ALL),
    Method("dga-zo", _TOWER, "black-box DGA: the pixel conv and the text shift + extra token trained zeroth-order "
           "from forward calls alone, the output adapters by the client's own backprop", 1e-3,
           (*_DGA_INPUTS, *_both("dga-output")), defaults={"dga-pixel": _ZO, "dga-text": _ZO},
           trained_by=_ZO_TRAIN),
    Method("prompt", _TOWER, "dark-gray prompt tuning: soft prompt tokens inserted into the text sequence (before "
           "the first token on a language model, after [CLS] on an encoder), trained by backprop through VJPs",
           1e-2, (Slot("dga-text", "text"),), defaults={"dga-text": {"shift": False, "extra_tokens": 8}},
           backbones=_ALL),
    Method("prompt-zo", _TOWER, "black-box prompt tuning (as BBT, ZIP): prompt tokens inserted into the text "
           "tower, trained zeroth-order from forward calls alone", 3e-3, (Slot("dga-text", "text"),),
           defaults={"dga-text": {**_ZO, "shift": False, "extra_tokens": 4}}, trained_by=_ZO_TRAIN, backbones=_ALL),
    Method("lga", _TOWER, "light-gray LGA: DGA plus tokens at the declared entry layers (on a language model: "
           "prefix tokens inside the decoder; on a diffusion model: tokens inside the text encoder)", 3e-3,
           (*_DGA_INPUTS, *_both("lga"), *_both("dga-output", if_port=True)), shown_in=_BOTH, backbones=_ALL),
    Method("lga-deep", _TOWER, "LGA as VPT-deep: each declared layer's tokens take the places of the previous "
           "layer's (the sequence keeps L+K tokens) instead of joining them", 3e-3,
           (*_DGA_INPUTS, *_both("lga"), *_both("dga-output", if_port=True)), defaults={"lga": {"stacking": "replace"}},
           backbones=_ALL),
    Method("dga-id", _TOWER, "DGA with the extra token's effect scaled by a zero-initialised gate: exactly the "
           "zero-shot model at init, for a second backbone call per text batch", 3e-3,
           (*_DGA_INPUTS, *_both("dga-output")), defaults={"dga-text": _GATED}),
    Method("lga-id", _TOWER, "LGA with the inserted tokens' effect scaled by zero-initialised gates: exactly the "
           "zero-shot model at init, for a second backbone call per batch of a tower with inserted tokens", 3e-3,
           (*_DGA_INPUTS, *_both("lga"), *_both("dga-output")), defaults={"dga-text": _GATED, "lga": _GATED}),
    Method("adalink", _TOWER, "AdaLink as published: a residual low-rank adapter on each tower's input tokens "
           "(text; image where the backbone publishes image.patch_embeds), read grants there, nothing at the "
           "outputs", 3e-3, (Slot("adalink", "image", if_port=True), Slot("adalink", "text")), shown_in=("bench",),
           backbones=_ALL),
    Method("adalink+output", _TOWER, "AdaLink on the text token embeddings (a read grant) plus output adapters on "
           "both towers (artifacts saved as adalink before graytune followed the paper load as this)", 3e-3,
           (Slot("adalink", "text"), *_both("dga-output")), shown_in=("demo",)),
    Method("lora", _WHITE, "white-box baseline: LoRA through PEFT on the client's copy of the module (on a "
           "diffusion model: the UNet's attention)", 1e-3,
           (Slot("lora"),), shown_in=_BOTH, backbones=_ALL),
    Method("full", _WHITE, "white-box baseline: full fine-tuning of the client's copy of the module (on a "
           "diffusion model: every UNet weight)", 3e-5,
           (Slot("full"),), shown_in=_BOTH, backbones=_ALL),
    Method("transmiter", _LOGIT, "TransMiter: a logit adapter distilled on a weak backbone, moved to a "
           "stronger one by an orthogonal basis change", 1e-3, (Slot("transmiter"),),
           recipe="extract", trained_by="graytune extract, then graytune transfer"),
    Method("transmiter+", _LOGIT, "TransMiter+: a transferred TransMiter fine-tuned with a few labels per class",
           1e-4, (Slot("transmiter"),), recipe="plus", trained_by="graytune train --adapter TRANSFERRED --shots K"),
]}


def get_method(name: str) -> Method:
    """The registered method ``name``; ``UnknownNameError`` with the closest names otherwise."""
    if name not in METHODS:
        raise UnknownNameError("method", name, METHODS, "graytune methods lists them")
    return METHODS[name]


def artifact_method(config: Mapping[str, Any]) -> Method:
    """The method an artifact's config records, reading older names as what they meant when written.

    Artifacts saved while ``adalink`` meant text AdaLink plus output adapters (their adapter list holds
    ``dga-output``) are today's ``adalink+output``: same slots, same tensor names, same outputs.
    """
    name = str(config.get("method"))
    adapters = {entry.get("name") for entry in config.get("adapters") or [] if isinstance(entry, Mapping)}
    if name == "adalink" and "dga-output" in adapters:
        log.info("this artifact was saved when adalink meant text AdaLink plus output adapters; "
                 "it loads as adalink+output")
        return METHODS["adalink+output"]
    return get_method(name)


def methods_of(kind: MethodKind) -> list[str]:
    return [name for name, m in METHODS.items() if m.kind is kind]


def methods_shown_in(table: str) -> list[str]:
    """The methods a table shows (``demo`` or ``bench``), in registry order (``Method.shown_in``)."""
    return [name for name, m in METHODS.items() if table in m.shown_in]
