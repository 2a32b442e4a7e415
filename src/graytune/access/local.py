"""The in-process boundary: a handle that exposes a backbone only at its granted level.

The handle is not an ``nn.Module``: putting it inside a client model adds no
parameters, and nothing it offers below white-box returns a weight. Gradients
cross it as one autograd node whose backward is the vector–Jacobian product at
the client's tensors, so adapters train with any optimizer.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from graytune.access.checks import CallPlan, plan_call, port_for, texts_of
from graytune.access.generation import (
    Generated, check_generation_plan, check_maps, count_generated, settings_of,
)
from graytune.access.handle import client_device, cross, encode_image, encode_text
from graytune.access.images import (
    ImageSettings, check_image_plan, count_images, image_settings_of, negative_inputs, sampling_arguments,
)
from graytune.access.owner import BoundaryCall, top_k_of, weight_storages
from graytune.access.topk import check_top_k_grant
from graytune.backbones.base import Backbone, module_placement, recomputing
from graytune.devices import dtype_name
from graytune.errors import AccessDeniedError
from graytune.types import AccessLevel, BackboneSpec, Exposure, GenerationSettings, Op, required_level

Tensor = torch.Tensor
#: fast tokenizers must not run on two threads at once ("Already borrowed"); a server tokenizes on many
_TOKENIZE_LOCK = threading.Lock()


class LocalHandle:
    """A backbone behind the boundary, in this process. Make one with ``open_backbone``.

    Example:
        >>> h = graytune.open_backbone("minilm", access="dark-gray")
        >>> shift = torch.zeros(1, 1, 384, requires_grad=True)
        >>> z = h.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"]
        >>> z.sum().backward()       # shift.grad is the VJP at the token embeddings
    """

    __slots__ = ("_backbone", "_full_spec", "_weights", "access", "spec", "exposure", "_grants", "_top_k", "device",
                 "dtype", "recompute")

    def __init__(self, backbone: Backbone, access: AccessLevel, reads: Collection[str] = (),
                 recompute: bool = False, top_k: int = 0) -> None:
        self._backbone = backbone
        self._full_spec = backbone.spec
        self._weights = weight_storages(backbone.module())  # once per handle: what no call's graph is charged for
        self.device, self.dtype = module_placement(backbone.module())
        self.recompute = recompute
        self.access = access
        self.spec: BackboneSpec = backbone.spec.visible_at(access)
        self.exposure = Exposure(access=access)
        self._grants = frozenset(reads)
        for name in self._grants:
            port_for(self._full_spec, name, Op.READ, access, False, self._grants)
        self._top_k = check_top_k_grant(self._full_spec, top_k)

    def __repr__(self) -> str:
        placed = "" if (self.device.type, self.dtype) == ("cpu", torch.float32) else \
            f", device={str(self.device)!r}, dtype={dtype_name(self.dtype)!r}"
        return f"LocalHandle({self.spec.id!r}, access={self.access.label!r}{placed})"

    @property
    def grants(self) -> frozenset[str]:
        """Input or entry ports this handle may read."""
        return self._grants

    @property
    def top_k_grant(self) -> int:
        """The most next tokens a forward may read per position (``top_k=``; 0: none, the default)."""
        return self._top_k

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"text.input_ids", "text.attention_mask"}`` for ``texts`` (the owner's tokenizer)."""
        texts = texts_of(texts)
        with _TOKENIZE_LOCK:
            return self._backbone.tokenize(texts)

    def forward(
        self,
        inputs: Mapping[str, Tensor | Sequence[str]],
        *,
        add: Mapping[str, Tensor] | None = None,
        insert: Mapping[str, Tensor] | None = None,
        outputs: Sequence[str] | None = None,
        reads: Sequence[str] = (),
        top_k: int = 0,
    ) -> dict[str, Tensor]:
        """Run the backbone; gradients flow back to any client tensor that requires them.

        Args:
            inputs: ``image.pixels`` ``[B, 3, H, W]``; ``text`` (a list of strings) or
                ``text.input_ids`` ``[B, L]`` (+ ``text.attention_mask``).
            add: per port, a delta broadcast onto its values (input ports from
                dark-gray, entry ports from light-gray).
            insert: per port, ``[B or 1, K, D]`` tokens (same levels as ``add``).
            outputs: output ports to return; default every output of the given modalities.
            reads: granted input/entry ports whose values to return too (detached).
            top_k: a language model's ``k`` most likely next tokens to return too (detached), at most the
                owner's grant (``top_k_grant``): ``text.top_ids`` ``[B, L, k]`` and ``text.top_logprobs``.

        Returns:
            ``{port name: tensor}`` for each output (and read) port.
        """
        plan = self.plan(inputs, add or {}, insert or {}, outputs, reads, top_k)
        if self.access is AccessLevel.WHITE_BOX:  # plain autograd: weights of a rebound module train too
            call = self.open_call(plan)
            moved = [{port: call.inward(t) for port, t in group.items()}
                     for group in (plan.inputs, plan.add, plan.insert)]
            with recomputing(self.recompute):
                result = self._backbone.run(*moved, plan.outputs, plan.reads, **top_k_of(plan))
            home = client_device(plan, self.device)
            return {name: result[name].to(home, torch.float32) for name in [*plan.outputs, *plan.reads]}
        return cross(self.open_call(plan), self.device)

    def generate(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                 insert: Mapping[str, Tensor] | None = None, maps: Mapping[str, Mapping[str, Tensor]] | None = None,
                 settings: GenerationSettings | Mapping[str, object] | None = None,
                 stream: Callable[[list[str]], None] | None = None) -> Generated:
        """Tokens a language model generates after each prompt, the owner decoding (see ``graytune.access.generation``).

        Args:
            inputs: ``{"text": [...]}`` or ``text.input_ids`` ``[B, L]`` (+ ``text.attention_mask``).
            add, insert: the edits a forward takes; a ``[B or 1, 1, D]`` add reaches generated tokens too.
            maps: per port, a token map ``{"down": [r, D], "up": [D, r]}`` applied to every token (needs the read
                grant there).
            settings: ``GenerationSettings`` (or its fields as a mapping): length, temperature, top-p, seed.
            stream: called after every generated token with each row's text so far.
        """
        chosen = settings_of(settings)
        with torch.no_grad():
            plan = self.plan(inputs, add or {}, insert or {}, [], [])
            check_generation_plan(self._full_spec, plan)
            checked = check_maps(self._full_spec, self.access, self._grants, maps or {}, self.exposure)
            call = self.open_call(plan)
            moved = [{port: call.inward(t) for port, t in group.items()} for group in (plan.inputs, plan.add,
                                                                                      plan.insert)]
            on_token = None
            if stream is not None:
                steps: list[Tensor] = []

                def on_token(step: Tensor) -> None:  # [B] the tokens just generated
                    steps.append(step.reshape(-1, 1).cpu())
                    done = torch.cat(steps, dim=1)
                    stream(self._backbone.detokenize(done, torch.full((len(done),), done.shape[1])))

            ids, lengths = self._backbone.generate(*moved, {port: {k: call.inward(v) for k, v in parts.items()}
                                                            for port, parts in checked.items()}, chosen,
                                                   on_token=on_token)
        count_generated(self.exposure, lengths)
        home = client_device(plan, self.device)
        return Generated(ids.to(home), lengths.to(home), self._backbone.detokenize(ids, lengths))

    def generate_images(self, inputs: Mapping[str, Tensor | Sequence[str]], *,
                        add: Mapping[str, Tensor] | None = None, insert: Mapping[str, Tensor] | None = None,
                        settings: ImageSettings | Mapping[str, object] | None = None) -> Tensor:
        """``[B, 3, H, W]`` float32 images in [0, 1] a diffusion model samples for each prompt, the owner sampling
        (see ``graytune.access.images``: what it reveals, its bounds).

        Args:
            inputs: ``{"text": [...]}`` or ``text.input_ids`` ``[B, L]`` (+ ``text.attention_mask``).
            add, insert: the edits a forward takes, applied to the prompts' encoding (not the negative prompt's).
            settings: ``ImageSettings`` (or its fields as a mapping): steps, guidance, seed, size, negative prompt.
        """
        chosen = image_settings_of(settings)
        with torch.no_grad():
            plan = self.plan(inputs, add or {}, insert or {}, [], [])
            sized = check_image_plan(self._full_spec, plan, chosen)
            negative = negative_inputs(self.tokenize([sized.negative_prompt]), plan.batch)
            call = self.open_call(plan)
            moved = [{port: call.inward(t) for port, t in group.items()}
                     for group in (plan.inputs, plan.add, plan.insert, negative)]
            images = self._backbone.sample(*moved, **sampling_arguments(sized))  # type: ignore[attr-defined]
        count_images(self.exposure, plan.batch, sized.num_inference_steps)
        return images.to(client_device(plan, self.device), torch.float32)

    def plan(self, inputs: Mapping[str, Tensor | Sequence[str]], add: Mapping[str, Tensor],
             insert: Mapping[str, Tensor], outputs: Sequence[str] | None, reads: Sequence[str],
             top_k: int = 0) -> CallPlan:
        """Check a request at this handle's level and note it in ``exposure`` (see ``forward``)."""
        return plan_call(self._full_spec, self.access, self._grants, self.exposure, self.tokenize,
                         inputs, add, insert, outputs, reads, top_k=top_k, top_k_grant=self._top_k)

    def check(self, inputs: Mapping[str, Tensor | Sequence[str]], add: Mapping[str, Tensor] | None = None,
              insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
              reads: Sequence[str] = (), top_k: int = 0) -> CallPlan:
        """Check a request as ``forward`` would, without running it or noting it in ``exposure``."""
        return plan_call(self._full_spec, self.access, self._grants, Exposure(access=self.access), self.tokenize,
                         inputs, add or {}, insert or {}, outputs, reads, top_k=top_k, top_k_grant=self._top_k)

    def open_call(self, plan: CallPlan, measure: bool = False) -> BoundaryCall:
        """A call the owner drives by hand (the server): ``forward`` now, ``vjp`` later.

        With ``measure`` the call counts the bytes its graph keeps (``nbytes``), the owner's weights excluded.
        """
        return BoundaryCall(self._backbone, plan, self.exposure, measure, self._weights, self.device, self.dtype,
                            self.recompute)

    def at_level(self, access: AccessLevel) -> LocalHandle:
        """The same backbone at a level no higher than this handle's (the grants that level may hold)."""
        if access > self.access:
            raise AccessDeniedError(f"a handle at {access.label}", access.label, self.access.label)
        grants = [n for n in self._grants if required_level(self._full_spec.port(n).kind, Op.READ, False) <= access]
        return LocalHandle(self._backbone, access, grants, self.recompute, self._top_k)

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings (not normalised), the CLIP way."""
        return encode_image(self, pixels, **edits)

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings (not normalised) for strings or tokenized ids."""
        return encode_text(self, text, **edits)

    def module(self) -> nn.Module:
        """A copy of the backbone module (white-box only: baselines such as LoRA, full fine-tuning).

        Its parameters are frozen; call ``requires_grad_()`` on what you fine-tune.
        """
        if self.access < AccessLevel.WHITE_BOX:
            raise AccessDeniedError("the backbone module", AccessLevel.WHITE_BOX.label, self.access.label,
                                    "gray-box methods use forward() with add=/insert= instead")
        return copy.deepcopy(self._backbone.module())

    def with_module(self, module: nn.Module) -> LocalHandle:
        """A white-box handle running ``module``: a modified copy from ``module()`` (LoRA, full fine-tuning)."""
        if self.access < AccessLevel.WHITE_BOX:
            raise AccessDeniedError("running a modified backbone module", AccessLevel.WHITE_BOX.label,
                                    self.access.label)
        return LocalHandle(self._backbone.with_module(module), self.access, self._grants, self.recompute, self._top_k)
