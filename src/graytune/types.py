"""Plain data shared by every layer: access levels, port and backbone specs.

A spec never holds weights: it names the ports a backbone publishes, their
shapes and dtypes, the preprocessing a client must apply, and a fingerprint.

Example:
    >>> spec = graytune.open_backbone("minilm").spec
    >>> spec.port("text.embeds").shape
    ('B', 384)
    >>> BackboneSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from graytune.errors import AccessDeniedError, InvalidInputError, UnknownNameError


class AccessLevel(enum.IntEnum):
    """How much of a backbone a client may touch, ordered from least to most."""

    BLACK_BOX = 0
    DARK_GRAY = 1
    LIGHT_GRAY = 2
    WHITE_BOX = 3

    @property
    def label(self) -> str:
        """The level as users write it: ``black-box``, ``dark-gray``, ..."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, value: AccessLevel | str) -> AccessLevel:
        """Accept an ``AccessLevel`` or its label (``dark-gray``, ``DARK_GRAY``)."""
        if isinstance(value, AccessLevel):
            return value
        key = str(value).strip().upper().replace("-", "_")
        if key in cls.__members__:
            return cls[key]
        raise UnknownNameError("access level", str(value), [lvl.label for lvl in cls])

    def __str__(self) -> str:
        return self.label


def require_level(granted: AccessLevel, needed: AccessLevel, what: str,
                  hint: str = "open the backbone at that level or pick another method") -> None:
    """The one level check: ``AccessDeniedError`` naming ``what``, the level needed and the level granted."""
    if granted < needed:
        raise AccessDeniedError(what, needed.label, granted.label, hint)


class PortKind(str, enum.Enum):
    """Where a port sits: at the inputs, inside the model, or at the outputs."""

    INPUT = "input"
    ENTRY = "entry"
    OUTPUT = "output"


class Op(str, enum.Enum):
    """What a client may do at a port (DESIGN.md §1)."""

    REPLACE = "replace"  # the client supplies the whole input (its own data)
    ADD = "add"  # a delta added to the port's values
    INSERT = "insert"  # extra vectors placed in the sequence
    READ = "read"  # the port's values come back to the client


def required_level(kind: PortKind, op: Op, with_grad: bool) -> AccessLevel:
    """The least access level at which ``op`` is allowed at a port of ``kind`` (DESIGN.md §1).

    At input ports, ``replace``, ``add`` and ``insert`` with no gradient asked are black-box (what
    zeroth-order prompt and input-adapter tuning sends). They are not free of exposure: at
    ``text.token_embeds`` a batch of ±ε edits gives Jacobian columns by finite differences (DESIGN.md §1;
    for pixels that is inherent to any black-box API), so the exposure record counts them
    (``Exposure.black_box_edits``) and a server's owner may count or refuse them (``graytune serve
    --black-box-edits``). Exact gradients start at dark-gray; entry ports at light-gray.
    ``read`` at input and entry ports reveals weights (for token embeddings, the
    embedding-table rows), so it is never implied by a level: the owner grants
    it per port. This function answers the level part of that rule only.
    """
    if kind is PortKind.OUTPUT:
        return AccessLevel.DARK_GRAY if with_grad else AccessLevel.BLACK_BOX
    if kind is PortKind.ENTRY:
        return AccessLevel.LIGHT_GRAY
    if op is not Op.READ and not with_grad:
        return AccessLevel.BLACK_BOX
    return AccessLevel.DARK_GRAY


def prompts_port(layer_port: str) -> str:
    """The prompts port ``<m>.prompts.k`` beside the entry port ``<m>.layer.k`` (``""`` for any other port).

    Example:
        >>> prompts_port("text.layer.2"), prompts_port("text.token_embeds")
        ('text.prompts.2', '')

    Tokens sent to ``<m>.prompts.k`` are prompts as in VPT-deep: the first such port of a request that
    gets tokens inserts them where an insert at ``<m>.layer.k`` goes, each later one writes over those
    same positions, so a tower holds one block of them at every layer (``is_prompts_port``).
    """
    modality, kind, layer = [*layer_port.split("."), "", ""][:3]
    return f"{modality}.prompts.{layer}" if kind == "layer" and layer else ""


def is_prompts_port(name: str) -> bool:
    """Whether ``name`` is a prompts port ``<m>.prompts.k``: its tokens take the places of the previous
    prompts port's, so a request's prompts add their ``K`` positions to a row once, not once per port."""
    parts = name.split(".")
    return len(parts) == 3 and parts[1] == "prompts"


#: preprocess fields that describe a backbone (added as graytune learned to say them), not what a client sends
DESCRIPTIVE_PREPROCESS = frozenset({"long_texts", "max_positions", "mean_std_from"})

Dim = int | str  # an int is fixed; a str names a free dimension ("B", "L", "H/8")


@dataclass(frozen=True)
class PortSpec:
    """One port: a stable name, where it sits, its shape, dtype and allowed ops.

    Attributes:
        name: stable string such as ``image.pixels`` or ``text.layer.4``.
        kind: input, entry (inside the model) or output.
        shape: dims; ints are fixed, strings are free (``B`` batch, ``L`` tokens).
        dtype: torch dtype name, e.g. ``float32`` or ``int64``.
        ops: what a client may do here (``replace``, ``add``, ``insert``, ``read``).
        modality: ``image`` or ``text`` (or ``""`` for ports of the whole model).
        doc: one line saying what the values are.
    """

    name: str
    kind: PortKind
    shape: tuple[Dim, ...]
    dtype: str
    ops: tuple[Op, ...]
    modality: str = ""
    doc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "ops": [op.value for op in self.ops],
            "modality": self.modality,
            "doc": self.doc,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PortSpec:
        return cls(
            name=data["name"],
            kind=PortKind(data["kind"]),
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            ops=tuple(Op(op) for op in data["ops"]),
            modality=data.get("modality", ""),
            doc=data.get("doc", ""),
        )


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a client may know about a backbone: ports and preprocessing.

    Attributes:
        id: the id the backbone was opened by, e.g. ``minilm``.
        modalities: ``("image",)``, ``("text",)`` or ``("image", "text")``.
        ports: every port the backbone publishes, in a stable order.
        preprocess: per modality, what a client applies before the input port
            (image size, mean/std; tokenizer name and max length).
        description: one paragraph on what the model is, and its caveats.
        fingerprint: sha256 of this spec and the weights' identity (not the weights).
    """

    id: str
    modalities: tuple[str, ...]
    ports: tuple[PortSpec, ...]
    preprocess: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    fingerprint: str = ""

    def port(self, name: str) -> PortSpec:
        """The port called ``name``; unknown names get the closest matches."""
        for port in self.ports:
            if port.name == name:
                return port
        raise UnknownNameError(f"port of backbone {self.id!r}", name, self.port_names())

    def port_names(self, kind: PortKind | None = None) -> list[str]:
        return [p.name for p in self.ports if kind is None or p.kind is kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "modalities": list(self.modalities),
            "ports": [p.to_dict() for p in self.ports],
            "preprocess": json.loads(json.dumps(self.preprocess)),
            "description": self.description,
            "fingerprint": self.fingerprint,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        try:
            return cls(
                id=data["id"],
                modalities=tuple(data["modalities"]),
                ports=tuple(PortSpec.from_dict(p) for p in data["ports"]),
                preprocess=data.get("preprocess", {}),
                description=data.get("description", ""),
                fingerprint=data.get("fingerprint", ""),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidInputError(
                f"not a backbone spec: {err!r}; expected the JSON that BackboneSpec.to_json() writes"
            ) from err

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        return cls.from_dict(json.loads(text))

    def with_fingerprint(self, weights_identity: str, added_ports: Collection[str] = ()) -> BackboneSpec:
        """This spec with its fingerprint computed from its content and ``weights_identity``.

        The id and description are left out: they name where the weights were loaded from
        (``hf-clip:./my-clip``), and the same weights under another path, working directory
        or copied folder must give the same fingerprint. Preprocess fields that describe the
        model rather than change what a client sends (``DESCRIPTIVE_PREPROCESS``) are left out
        too, so describing a backbone better never orphans the adapters trained on it. ``weights_identity`` must hence not
        hold a path either (see ``backbones.loading.file_identity``). ``added_ports`` are ports a provider
        published after adapters had been trained on it: they change nothing an older adapter sends,
        so they are left out of the hash and those adapters still load. The prompts ports
        (``is_prompts_port``) came after adapters on every tower, so they are always left out.
        """
        preprocess = {m: {k: v for k, v in fields.items() if k not in DESCRIPTIVE_PREPROCESS}
                      for m, fields in self.preprocess.items()}
        ports = tuple(p for p in self.ports if p.name not in added_ports and not is_prompts_port(p.name))
        body = replace(self, id="", description="", fingerprint="", preprocess=preprocess, ports=ports).to_json()
        digest = hashlib.sha256((body + "\n" + weights_identity).encode()).hexdigest()
        return replace(self, fingerprint=digest)

    def visible_at(self, level: AccessLevel) -> BackboneSpec:
        """The spec a client at ``level`` sees: entry ports only from light-gray up."""
        ports = tuple(
            p for p in self.ports if p.kind is not PortKind.ENTRY or level >= AccessLevel.LIGHT_GRAY
        )
        return replace(self, ports=ports)


@dataclass
class Exposure:
    """What a client has learnt through a handle: the record artifacts carry.

    Attributes:
        access: the level the handle was granted.
        ports: per port name, the set of ops used there.
        dims: per port name, the feature dims it revealed (its fixed shape).
        forward_queries: number of forward calls.
        forward_samples: number of samples sent through forward.
        gradient_queries: number of vector–Jacobian products taken.
        gradient_samples: rows whose VJP came back (the batch of each differentiated call), what a server's
            ``--quota-grad-rows`` bounds.
        generated_tokens: tokens a language model generated for the client (each one a forward of one position).
        generated_images: images a diffusion model sampled for the client (``generate_images``; only the decoded
            images come back, each one a forward of its prompt row).
        denoising_steps: the sampler's steps summed over those images (rows x steps), the UNet evaluations that
            shaped what came back.
        top_k: what top-k reads revealed of language models' next-token distributions (``top_k=`` on a forward,
            an owner's grant): ``{"calls", "positions", "values"}``, values = positions x k (a full distribution
            is V values per position).
        black_box_edits: forwards at black-box that sent ``add``/``insert`` at an input port with no gradient asked
            (what zeroth-order input adapters send): ``{"calls", "rows", "ports": {port: rows}}``. Such edits are
            not free of exposure: a batch of one text under ±ε edits gives Jacobian columns at that port by finite
            differences (for pixels, continuous raw inputs, that is inherent; for token embeddings it is a
            capability the owner grants: ``graytune serve --black-box-edits``).
    """

    access: AccessLevel
    ports: dict[str, set[str]] = field(default_factory=dict)
    dims: dict[str, list[Dim]] = field(default_factory=dict)
    forward_queries: int = 0
    forward_samples: int = 0
    gradient_queries: int = 0
    gradient_samples: int = 0
    generated_tokens: int = 0
    generated_images: int = 0
    denoising_steps: int = 0
    black_box_edits: dict[str, Any] = field(default_factory=lambda: {"calls": 0, "rows": 0, "ports": {}})
    top_k: dict[str, int] = field(default_factory=lambda: {"calls": 0, "positions": 0, "values": 0})

    def note(self, port: PortSpec, op: Op) -> None:
        self.ports.setdefault(port.name, set()).add(op.value)
        self.dims[port.name] = list(port.shape)

    def note_black_box_edits(self, ports: Collection[str], rows: int) -> None:
        """Record one black-box call of ``rows`` rows that edited ``ports`` (input ports, no gradient asked)."""
        edits = self.black_box_edits
        edits["calls"] += 1
        edits["rows"] += rows
        for name in ports:
            edits["ports"][name] = edits["ports"].get(name, 0) + rows

    def note_top_k(self, positions: int, k: int) -> None:
        """Record one forward that read the ``k`` most likely next tokens at ``positions`` positions."""
        self.top_k["calls"] += 1
        self.top_k["positions"] += positions
        self.top_k["values"] += positions * k

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["access"] = self.access.label
        data["ports"] = {k: sorted(v) for k, v in sorted(self.ports.items())}
        return data


#: A language model's top-k read (``top_k=`` on a forward, the owner's grant): the ``k`` most likely next tokens
#: ``[B, L, k]`` int64 (-100 where the mask is 0) and their log-probabilities ``[B, L, k]`` float32 (0.0 there).
TOP_IDS, TOP_LOGPROBS = "text.top_ids", "text.top_logprobs"
#: The largest top-k an owner may grant (a full distribution is the model's whole vocabulary per position).
MAX_TOP_K = 20

#: The most tokens one generation request may ask for (per row).
MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class GenerationSettings:
    """How a language model behind the boundary decodes (the owner decodes; the client gets token ids).

    Attributes:
        max_new_tokens: tokens to generate per row at most (1..``MAX_NEW_TOKENS``).
        temperature: 0 decodes greedily; above 0 samples from the distribution at that temperature.
        top_p: sampling keeps the smallest set of tokens whose probability reaches ``top_p`` (1: all).
        seed: the sampling draws' seed (the same request gives the same tokens).
        stop_at_eos: a row stops at the model's end-of-sequence token (which is kept).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            problems.append(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}; got "
                            f"{self.max_new_tokens!r}")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature <= 100:
            problems.append(f"temperature must be from 0 (greedy) to 100; got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be above 0 and at most 1; got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a whole number >= 0; got {self.seed!r}")
        if problems:
            raise InvalidInputError("generation settings refused: " + "; ".join(problems))
