"""What one audit runs: the levels, the budget in boundary calls, the attacker's batch and the probe task.

Example:
    >>> config = AuditConfig(levels=("black-box", "dark-gray"), budget=1000)
    >>> config.check()          # every problem at once, as one InvalidInputError
"""

from __future__ import annotations

from dataclasses import dataclass

from graytune.errors import InvalidInputError
from graytune.types import AccessLevel

#: the largest --budget: 10^5 calls is the top of the range the exposure study asks for
MAX_BUDGET = 100_000
#: the most rows one attack call may send (a server's --max-tokens / --max-grad-pixels bound them further)
MAX_ROWS = 1024
#: the extraction attacks (graytune.audit.extraction)
ATTACKS = ("outputs", "differences", "vjp")
#: what each modality's probe task is when --data is not given
DEFAULT_DATA = {"text": "wordnet-supersense", "image": "fashion-mnist"}


@dataclass
class AuditConfig:
    """How an audit attacks a backbone (``graytune audit`` flags)."""

    levels: tuple[str, ...] = ("black-box",)
    """Access levels to audit, each as its own attacker: black-box, dark-gray, light-gray."""
    budget: int = 1000
    """Boundary calls each attack may spend: a forward is one call, a VJP one more."""
    rows: int = 16
    """Rows (texts or images) the attacker sends in one call."""
    reads: tuple[str, ...] = ()
    """Ports whose values the owner grants the attacker (text.token_embeds: the embedding rows)."""
    modality: str = "auto"
    """Tower to attack: text, image, or auto (text for a text encoder, else image)."""
    data: str = ""
    """Labelled set for the linear probe: wordnet-supersense (text) or fashion-mnist (images); default by tower."""
    image_size: int = 64
    """Side of the images sent, for backbones that take any size (a fixed-size port keeps its own)."""
    probe_train: int = 2000
    """Labelled items the linear probes are fitted on (backbone's and surrogate's alike)."""
    probe_test: int = 1000
    """Held-out items the probes are scored on; the surrogate's agreement and cosine are measured on them too."""
    attacks: tuple[str, ...] = ("outputs", "differences", "vjp")
    """Extraction attacks to run where a level allows them: outputs and differences (black-box), vjp (dark-gray
    and up); the Jacobian, geometry and read attacks always run."""
    cotangents: int = 1
    """Dark-gray and up: copies of an item per call, each with its own per-token edit and output cotangent (a VJP
    per copy), so each item comes back with this many per-token Jacobian products (1: a distinct item per row,
    which extracted most per call on MiniLM; docs/exposure.md)."""
    fd_edits: int = 1
    """Black-box: edited copies of an item per call beside it (an edit at text.token_embeds, no gradient asked),
    each giving a finite-difference slope of the output along its edit (1 extracted most per call on MiniLM)."""
    fd_epsilon: float = 1e-2
    """Black-box: the finite-difference step, the length each token's embedding (or the pixels) moves."""
    steps_per_call: int = 2
    """Surrogate updates after each boundary call (and 25 times as many at each checkpoint)."""
    buffer_mb: float = 256.0
    """Memory for the outputs the surrogate learns from, in MiB, and as much again for derivative rows (slopes,
    VJPs); past it old answers are replaced at random."""
    geometry_tokens: int = 16
    """Tokens whose embedding rows the geometry probe recovers (dark-gray and up, text)."""
    geometry_calls: int = 100
    """Most calls the geometry probe spends (and never more than --budget)."""
    seed: int = 0
    """Seed of the queries, the surrogate and the probes."""

    def access_levels(self) -> list[AccessLevel]:
        """The levels, parsed and sorted, each once."""
        return sorted({AccessLevel.parse(level) for level in self.levels})

    def check(self) -> None:
        """Every problem with these settings, raised at once as one ``InvalidInputError``."""
        problems = []
        if not self.levels:
            problems.append("no access level given: pass --access black-box, dark-gray and/or light-gray")
        for level in self.levels:
            try:
                parsed = AccessLevel.parse(level)
            except InvalidInputError as err:
                problems.append(str(err))
                continue
            if parsed >= AccessLevel.WHITE_BOX:
                problems.append("white-box hands over the module itself, so there is nothing to extract; audit "
                                "black-box, dark-gray or light-gray")
        for name, value, low, high in (("--budget", self.budget, 1, MAX_BUDGET), ("--rows", self.rows, 1, MAX_ROWS),
                                       ("--probe-train", self.probe_train, 20, 50_000),
                                       ("--probe-test", self.probe_test, 20, 50_000),
                                       ("--steps-per-call", self.steps_per_call, 0, 100),
                                       ("--cotangents", self.cotangents, 1, MAX_ROWS),
                                       ("--fd-edits", self.fd_edits, 1, MAX_ROWS - 1),
                                       ("--geometry-tokens", self.geometry_tokens, 3, 128),
                                       ("--geometry-calls", self.geometry_calls, 3, MAX_BUDGET),
                                       ("--image-size", self.image_size, 16, 512)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                problems.append(f"{name} is {value!r}; give a whole number from {low:,} to {high:,}")
        if not isinstance(self.fd_epsilon, float | int) or not 1e-5 <= self.fd_epsilon <= 1.0:
            problems.append(f"--fd-epsilon is {self.fd_epsilon!r}; give a step from 1e-5 to 1 (float32 outputs: "
                            "below about 1e-3 rounding dominates the differences)")
        for name, per_item in (("--cotangents", self.cotangents), ("--fd-edits", self.fd_edits + 1)):
            if isinstance(per_item, int) and isinstance(self.rows, int) and per_item > self.rows:
                problems.append(f"{name} asks {per_item} rows per item but --rows is {self.rows}; raise --rows to at "
                                f"least {per_item} or lower {name}")
        if not 1.0 <= self.buffer_mb <= 65536:
            problems.append(f"--buffer-mb is {self.buffer_mb!r}; give 1 to 65536 MiB")
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown or not self.attacks:
            problems.append(f"--attacks is {list(self.attacks)!r}; choose one or more of {', '.join(ATTACKS)}")
        if self.modality not in ("auto", "text", "image"):
            problems.append(f"--modality is {self.modality!r}; choose auto, text or image")
        if problems:
            raise InvalidInputError("graytune audit cannot run these settings:\n  - " + "\n  - ".join(problems))
