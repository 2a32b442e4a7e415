"""The remote boundary: a handle on a backbone that an owner serves over HTTP (``graytune serve``).

It offers what the in-process handle offers (``spec``, ``forward``, ``encode_*``,
``tokenize``, ``exposure``), and its backbone is one autograd node too: the node's
backward posts the outputs' gradients and gets back the VJP at the client's
tensors. Requests are checked here first (the same checks as the server's), so
mistakes fail fast with the in-process message.

Sessions are kept by the server only until their VJP. When the server answers 410
(the session expired, was evicted, or lives on another worker or before a restart)
the client resends the forward with its gradients and the server recomputes it;
unreachable servers are retried with back-off. On opening, the client reads the
server's protocol version from ``/v1/spec`` and refuses a server that cannot read its
messages (see ``graytune.access.wire``).

Example:
    >>> h = graytune.open_backbone("http://127.0.0.1:8470", access="dark-gray", api_key=KEY)
    >>> shift = torch.zeros(1, 1, 384, requires_grad=True)
    >>> h.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import httpx
import torch
from torch import nn

from graytune.access.checks import CallPlan, plan_call, texts_of
from graytune.access.handle import cross
from graytune.access.wire import (
    PROTOCOL_VERSION, check_server_protocol, decode, pack_call, pack_grads, pack_recompute, unpack_result,
    unpack_vjp,
)
from graytune.errors import AccessDeniedError, InvalidInputError, RemoteError
from graytune.types import AccessLevel, BackboneSpec, Exposure

log = logging.getLogger(__name__)
Tensor = torch.Tensor
API_KEY_ENV = "GRAYTUNE_API_KEY"


class RemoteHandle:
    """A backbone behind a server's boundary. Make one with ``open_backbone("http://host:port", ...)``."""

    def __init__(self, url: str, access: AccessLevel, reads: Collection[str] = (), api_key: str | None = None,
                 timeout_s: float = 120.0, retries: int = 5) -> None:
        key = api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise InvalidInputError(f"{url} needs an API key: pass api_key=... or set {API_KEY_ENV}")
        self.url, self.retries = url.rstrip("/"), retries
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {key}"})
        info = self._request("GET", "/v1/spec", params={"access": AccessLevel.parse(access).label}).json()
        self.protocol = check_server_protocol(info, self.url)
        self.access = AccessLevel.parse(info["access"])
        self.spec: BackboneSpec = BackboneSpec.from_dict(info["spec"])
        self.exposure = Exposure(access=self.access)
        missing = sorted(set(reads) - set(info["reads"]))
        if missing:
            raise AccessDeniedError(f"read at {', '.join(missing)}", "an explicit grant by the owner",
                                    f"grants {info['reads']}", "ask the owner to serve with --reads")
        self._grants = frozenset(reads)

    def __repr__(self) -> str:
        return f"RemoteHandle({self.url!r}, {self.spec.id!r}, access={self.access.label!r})"

    @property
    def grants(self) -> frozenset[str]:
        return self._grants

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def close(self) -> None:
        self._http.close()

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"text.input_ids", "text.attention_mask"}`` from the owner's tokenizer."""
        payload = {"texts": texts_of(texts), "protocol": PROTOCOL_VERSION}
        body = self._request("POST", "/v1/tokenize", json=payload).content
        return decode(body)[0]

    def forward(
        self,
        inputs: Mapping[str, Tensor | Sequence[str]],
        *,
        add: Mapping[str, Tensor] | None = None,
        insert: Mapping[str, Tensor] | None = None,
        outputs: Sequence[str] | None = None,
        reads: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        """As ``LocalHandle.forward``; the backbone runs on the server."""
        plan = plan_call(self.spec, self.access, self._grants, self.exposure, self.tokenize,
                         inputs, add or {}, insert or {}, outputs, reads)
        return cross(_RemoteCall(self, plan))

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings (not normalised)."""
        return self.forward({"image.pixels": pixels}, outputs=["image.embeds"], **edits)["image.embeds"]

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings (not normalised) for strings or tokenized ids."""
        inputs = dict(text) if isinstance(text, Mapping) else {"text": text}
        return self.forward(inputs, outputs=["text.embeds"], **edits)["text.embeds"]

    def module(self) -> nn.Module:
        raise AccessDeniedError("the backbone module", AccessLevel.WHITE_BOX.label, self.access.label,
                                "white-box access never crosses the network")

    def with_module(self, module: nn.Module) -> RemoteHandle:
        raise AccessDeniedError("running a modified backbone module", AccessLevel.WHITE_BOX.label,
                                self.access.label, "white-box access never crosses the network")

    def stats(self) -> dict[str, Any]:
        """The server's session counters and this client's quota use."""
        return self._request("GET", "/v1/stats").json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with back-off while the server cannot be reached; 4xx/5xx raise."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if attempt == self.retries:
                    raise RemoteError(0, "unreachable", f"backbone server {self.url} could not be reached "
                                      f"after {self.retries + 1} tries ({err}); is graytune serve running?") from None
                time.sleep(min(0.2 * 2**attempt, 3.0))
                continue
            if response.status_code < 400:
                return response
            if response.status_code in (502, 503) and attempt < self.retries:
                log.info("backbone server busy (%d); retrying", response.status_code)
                time.sleep(min(0.2 * 2**attempt, 3.0))
                continue
            raise _error(response)
        raise AssertionError("unreachable")


class _RemoteCall:
    """One forward on the server, and what it takes to get its VJP (or recompute it)."""

    def __init__(self, handle: RemoteHandle, plan: CallPlan) -> None:
        self.handle, self.plan = handle, plan
        self.values_read: dict[str, Tensor] = {}
        self.session: str | None = None

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        body = pack_call(self.plan, self.handle.access.label)
        result = unpack_result(decode(self.handle._request("POST", "/v1/forward", content=body).content), self.plan)
        self.session, self.values_read = result.session, result.values_read
        return result.outputs

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        result = None
        if self.session is not None:
            try:
                body = self.handle._request("POST", "/v1/vjp", content=pack_grads(self.plan, grads, self.session))
                result = unpack_vjp(decode(body.content), self.plan)
            except RemoteError as err:
                if err.status != 410:
                    raise
                log.info("session %s… is gone on the server; resending the forward to recompute", self.session[:8])
        if result is None:
            content = pack_recompute(self.plan, self.handle.access.label, grads)
            result = unpack_vjp(decode(self.handle._request("POST", "/v1/vjp", content=content).content), self.plan)
        self.session = None
        self.handle.exposure.gradient_queries += 1
        return result


def _error(response: httpx.Response) -> Exception:
    try:
        payload = response.json()
        kind, detail = str(payload["error"]), str(payload["detail"])
    except (ValueError, KeyError, TypeError):
        kind, detail = "http", response.text[:200]
    if response.status_code == 400:
        return InvalidInputError(f"the backbone server refused the request: {detail}")
    return RemoteError(response.status_code, kind, detail)
