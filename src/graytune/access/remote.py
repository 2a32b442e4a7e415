"""The remote boundary: a handle on a backbone that an owner serves over HTTP (``graytune serve``).

It offers what the in-process handle offers (``spec``, ``forward``, ``generate``, ``encode_*``,
``tokenize``, ``exposure``), and its backbone is one autograd node too: the node's
backward posts the outputs' gradients and gets back the VJP at the client's
tensors. Requests are checked here first (the same checks as the server's), so
mistakes fail fast with the in-process message. ``submit``, ``forward_chunks`` and
``forward_backward`` keep several requests in flight (``graytune.access.remote_async``).

Sessions are kept by the server only until their VJP. When the server answers 410
(the session expired, was evicted, or lives on another worker or before a restart)
the client resends the forward with its gradients and the server recomputes it.

Restarts cost time, not errors: a request the server could not take (unreachable,
connection dropped, 502/503) is retried with exponential back-off, honouring
``Retry-After``, for up to ``retry_s`` seconds in all (default 120). Each attempt waits
at most ``timeout_s`` for its answer, and an attempt that times out is not retried
(the server may still be working on it): the error says so. Every forward carries a
key of its own, so a retried forward replaces the session of its earlier attempt
instead of leaving an orphan. On opening, the client reads the server's protocol
version from ``/v1/spec`` and refuses a server that cannot read its messages (see
``graytune.access.wire``).

Example:
    >>> h = graytune.open_backbone("http://127.0.0.1:8470", access="dark-gray", api_key=KEY)
    >>> shift = torch.zeros(1, 1, 384, requires_grad=True)
    >>> h.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch
from torch import nn

from graytune.access import images, remote_async
from graytune.access.checks import CallPlan, plan_call, texts_of
from graytune.access.generation import (
    Generated, check_generation_plan, check_maps, count_generated, pack_generate, read_stream_line, settings_of,
    unpack_generated,
)
from graytune.access.handle import client_device, cross, encode_image, encode_text
from graytune.access.replies import busy_problem, busy_state, error_of, error_of_response, retry_after
from graytune.access.topk import remote_top_k_grant
from graytune.access.wire import (
    PROTOCOL_VERSION, check_server_protocol, decode, pack_call, pack_grads, pack_recompute, unpack_result,
    unpack_vjp,
)
from graytune.errors import AccessDeniedError, GraytuneError, InvalidInputError, RemoteError, UnknownNameError
from graytune.types import AccessLevel, BackboneSpec, Exposure, GenerationSettings

log = logging.getLogger(__name__)
Tensor = torch.Tensor
API_KEY_ENV = "GRAYTUNE_API_KEY"
#: how long a request is retried while the server cannot take it, in seconds (``retry_s``)
DEFAULT_RETRY_S = 120.0
#: how long one attempt waits for its answer, in seconds (``timeout_s``); above the server's default deadline
DEFAULT_TIMEOUT_S = 180.0


class RemoteHandle:
    """A backbone behind a server's boundary. Make one with ``open_backbone("http://host:port", ...)``.

    Args:
        url: the server, ``http://host:port``.
        access: the level asked for (at most the server's).
        reads: ports whose values the owner granted to read.
        api_key: the key the owner gave you (default: ``$GRAYTUNE_API_KEY``).
        retry_s: how long a request is retried while the server cannot take it (restarts,
            dropped connections, 502/503), in seconds; ``None``: ``DEFAULT_RETRY_S`` (120).
        timeout_s: how long one attempt waits for its answer; ``None``: ``DEFAULT_TIMEOUT_S`` (180).
            A call takes at most about ``retry_s + timeout_s``.
        retries: at most this many retries as well (``None``: only the time budget counts).
        top_k: the most next tokens a forward will read per position (``top_k=``), at most the server's grant.
        max_in_flight: the most requests ``submit``, ``forward_chunks`` and ``forward_backward`` keep in flight.
    """

    def __init__(self, url: str, access: AccessLevel, reads: Collection[str] = (), api_key: str | None = None,
                 timeout_s: float | None = None, retries: int | None = None, *, retry_s: float | None = None,
                 top_k: int = 0, max_in_flight: int = 4) -> None:
        key = api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise InvalidInputError(f"{url} needs an API key: set ${API_KEY_ENV} to the key the server's owner gave "
                                    "you (in Python, api_key=... works too)")
        #: where the key came from, for the message when the server refuses it
        self.key_source = "api_key=" if api_key else f"${API_KEY_ENV}"
        self.retry_s = DEFAULT_RETRY_S if retry_s is None else float(retry_s)
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if self.retry_s < 0 or self.timeout_s <= 0 or max_in_flight < 1:
            raise InvalidInputError(f"retry_s must be >= 0 and timeout_s > 0 seconds, max_in_flight >= 1; got retry_s="
                                    f"{retry_s}, timeout_s={timeout_s}, max_in_flight={max_in_flight}")
        self.url, self.retries, self.max_in_flight = url.rstrip("/"), retries, int(max_in_flight)
        #: the last busy reply (502/503): ``{"status", "queued", "retry_after_s", "at"}`` (``access.replies``)
        self.queue_state: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(self.timeout_s, connect=min(
            10.0, self.timeout_s)), headers={"Authorization": f"Bearer {key}"})
        info = self._request("GET", "/v1/spec", params={"access": AccessLevel.parse(access).label}).json()
        self.protocol = check_server_protocol(info, self.url)
        self.access = AccessLevel.parse(info["access"])
        self.spec: BackboneSpec = BackboneSpec.from_dict(info["spec"])
        #: where results land when a request holds no tensor of the client's (text sent as strings)
        self.device = torch.device("cpu")
        #: where and in which precision the owner runs the backbone (``{"device", "dtype", "recompute"}``)
        self.placement: dict[str, Any] = dict(info.get("placement", {}))
        self.exposure = Exposure(access=self.access)
        missing = sorted(set(reads) - set(info["reads"]))
        if missing:
            granted = ", ".join(info["reads"]) or "no port"
            raise AccessDeniedError(
                f"read at {', '.join(missing)}", "an explicit grant by the owner", f"reads at {granted}", message=(
                    f"reading {', '.join(missing)} needs an explicit grant by the server's owner (values read at "
                    f"input and inner ports reveal weights, so they are granted port by port); {self.url} grants "
                    f"reads at {granted}; ask the owner to run graytune serve --reads {' '.join(missing)}, or "
                    "train a method that reads nothing (graytune methods shows the reads each needs)"))
        self._grants = frozenset(reads)
        self._top_k = remote_top_k_grant(top_k, int(info.get("top_k", 0)), self.url)

    def __repr__(self) -> str:
        return f"RemoteHandle({self.url!r}, {self.spec.id!r}, access={self.access.label!r})"

    @property
    def grants(self) -> frozenset[str]:
        return self._grants

    @property
    def top_k_grant(self) -> int:
        """The most next tokens a forward may read per position (``top_k=``), as opened (within the server's)."""
        return self._top_k

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
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
        top_k: int = 0,
    ) -> dict[str, Tensor]:
        """As ``LocalHandle.forward``; the backbone runs on the server."""
        return cross(_RemoteCall(self, self._plan(inputs, add, insert, outputs, reads, top_k)))

    # futures, micro-batches in flight, a pipelined training step (``graytune.access.remote_async``)
    submit = remote_async.submit
    forward_chunks = remote_async.forward_chunks
    forward_backward = remote_async.forward_backward
    # images a diffusion model samples on the server (``graytune.access.images``)
    generate_images = images.remote_generate_images

    def _plan(self, inputs: Mapping[str, Tensor | Sequence[str]], add: Mapping[str, Tensor] | None,
              insert: Mapping[str, Tensor] | None, outputs: Sequence[str] | None, reads: Sequence[str],
              top_k: int) -> CallPlan:
        """A forward's checks (``plan_call``); a port above the level gets the server's refusal."""
        try:
            return plan_call(self.spec, self.access, self._grants, self.exposure, self.tokenize,
                             inputs, add or {}, insert or {}, outputs, reads, top_k=top_k, top_k_grant=self._top_k)
        except UnknownNameError as err:
            self._above_level(err.name, add or {}, insert or {}, [*reads, *(outputs or [])])
            raise

    def _call(self, plan: CallPlan) -> _RemoteCall:
        """A call to send later, its request packed now (later in-place updates do not change it)."""
        call = _RemoteCall(self, plan)
        call.body = pack_call(plan, self.access.label, call.key)
        return call

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="graytune-remote")
            return self._executor

    def generate(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                 insert: Mapping[str, Tensor] | None = None, maps: Mapping[str, Mapping[str, Tensor]] | None = None,
                 settings: GenerationSettings | Mapping[str, object] | None = None,
                 stream: Callable[[list[str]], None] | None = None) -> Generated:
        """As ``LocalHandle.generate``; the owner decodes on the server (``POST /v1/generate``).

        With ``stream`` the server sends each row's text so far after every generated token (one-row prompts,
        as in process) and ``stream`` gets it as it arrives: the answer is read line by line, so a long
        generation never waits past ``timeout_s`` for a token.
        """
        chosen = settings_of(settings)
        with torch.no_grad():
            try:
                plan = plan_call(self.spec, self.access, self._grants, self.exposure, self.tokenize, inputs,
                                 add or {}, insert or {}, [], [])
            except UnknownNameError as err:
                self._above_level(err.name, add or {}, insert or {}, [])
                raise
            check_generation_plan(self.spec, plan)
            checked = check_maps(self.spec, self.access, self._grants, maps or {}, self.exposure)
        body = pack_generate(plan, self.access.label, checked, chosen, stream=stream is not None)
        if stream is None:
            result = unpack_generated(decode(self._request("POST", "/v1/generate", content=body).content))
        else:
            result = self._streamed("/v1/generate", body, stream)
        count_generated(self.exposure, result.lengths)
        home = client_device(plan, self.device)
        return Generated(result.ids.to(home), result.lengths.to(home), result.texts)

    def _streamed(self, path: str, body: bytes, stream: Callable[[list[str]], None]) -> Generated:
        """A streamed generation: each ``{"texts"}`` line to ``stream``, the last line's ``Generated`` returned."""
        response = self._request("POST", path, content=body, stream=True)
        try:
            for line in response.iter_lines():
                part = read_stream_line(line) if line.strip() else {}
                if "generated" in part:
                    return part["generated"]  # type: ignore[no-any-return]
                if "error" in part:
                    raise error_of(int(part.get("status", 500)), str(part["error"]), str(part.get("detail", "")))
                if "texts" in part:
                    stream([str(t) for t in part["texts"]])
        except httpx.ReadTimeout:
            raise RemoteError(0, "timeout", f"POST {path} at {self.url} sent no line within {self.timeout_s:g} s "
                              "(timeout_s); raise timeout_s or ask fewer tokens") from None
        finally:
            response.close()
        raise RemoteError(0, "truncated", f"the stream of POST {path} at {self.url} ended before its last line "
                          "(the server went away?); send the request again")

    def _above_level(self, name: str, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                     read: Sequence[str]) -> None:
        """Raise the server's ``AccessDeniedError`` if ``name``, unknown in this level's spec, is a port above it.

        The spec a client gets shows only its level's ports; the in-process handle, holding the whole spec,
        refuses a port above the level with the level it needs. The server answers the same (``/v1/check-port``).
        """
        if name in self.spec.port_names() or self.access >= AccessLevel.LIGHT_GRAY:
            return
        edits = {"add": add, "insert": insert}
        op = next((o for o, group in edits.items() if name in group), "read" if name in read else None)
        if op is None:
            return
        value = edits.get(op, {}).get(name)
        grad = bool(isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled())
        try:
            self._request("GET", "/v1/check-port", params={"name": name, "op": op, "grad": grad,
                                                             "access": self.access.label})
        except InvalidInputError as err:  # the server's reason, e.g. an op the port does not take
            if getattr(err, "kind", "") != "unknown_name":
                raise
        except AccessDeniedError:
            raise
        except GraytuneError:  # an older server, or another failure: the local error stands
            return

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings (not normalised)."""
        return encode_image(self, pixels, **edits)

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings (not normalised) for strings or tokenized ids."""
        return encode_text(self, text, **edits)

    def module(self) -> nn.Module:
        raise AccessDeniedError("the backbone module", AccessLevel.WHITE_BOX.label, self.access.label,
                                "white-box access never crosses the network")

    def with_module(self, module: nn.Module) -> RemoteHandle:
        raise AccessDeniedError("running a modified backbone module", AccessLevel.WHITE_BOX.label,
                                self.access.label, "white-box access never crosses the network")

    def stats(self) -> dict[str, Any]:
        """The server's session counters and this client's quota use."""
        return self._request("GET", "/v1/stats").json()

    def release(self, session: str) -> bool:
        """Free a session on the server that will not be differentiated (the id travels in the body)."""
        return bool(self._request("POST", "/v1/sessions/release", json={"session": session}).json()["released"])

    def _request(self, method: str, path: str, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One request, retried with back-off while the server cannot take it, for ``retry_s`` in all.

        Retried: connection failures and drops, 502 and 503 (after ``Retry-After`` when given).
        Not retried: an attempt that got no answer within ``timeout_s``, and every other 4xx/5xx.
        With ``stream`` a successful answer comes back unread (the caller reads and closes it).
        """
        start, attempt = time.monotonic(), 0
        while True:
            try:
                if not stream:
                    response = self._http.request(method, path, **kwargs)
                else:
                    response = self._http.send(self._http.build_request(method, path, **kwargs), stream=True)
                    if response.status_code >= 400:
                        response.read()
                        response.close()
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
                raise RemoteError(0, "timeout", f"{method} {path} at {self.url} got no answer within "
                                  f"{self.timeout_s:g} s (timeout_s); it was not retried, since the server may "
                                  "still be working on it: raise timeout_s or send smaller batches") from None
            except httpx.TransportError as err:
                problem, wait = f"could not be reached ({type(err).__name__}: {err})", None
            else:
                if response.status_code < 400:
                    return response
                if response.status_code == 401:
                    raise RemoteError(401, "unauthorized", f"the API key from {self.key_source} was refused by "
                                      f"{self.url}; check it with the server's owner (a key is one line of their "
                                      "--api-keys file)") from None
                if response.status_code not in (502, 503):
                    raise error_of_response(response)
                self.queue_state = busy_state(response)
                problem, wait = busy_problem(self.queue_state), retry_after(response)
            wait = min(10.0, 0.25 * 2**attempt) if wait is None else wait
            spent = time.monotonic() - start
            if spent + wait > self.retry_s or (self.retries is not None and attempt >= self.retries):
                raise RemoteError(0, "unreachable", f"backbone server {self.url} {problem}; gave up after "
                                  f"{attempt + 1} tries in {spent:.1f} s (retry_s={self.retry_s:g}); is graytune "
                                  "serve running there?") from None
            (log.warning if attempt == 0 else log.info)(
                "backbone server %s %s; retrying for up to %.0f s more", self.url, problem, self.retry_s - spent)
            time.sleep(wait)
            attempt += 1


class _RemoteCall:
    """One forward on the server, and what it takes to get its VJP (or recompute it)."""

    def __init__(self, handle: RemoteHandle, plan: CallPlan) -> None:
        self.handle, self.plan = handle, plan
        self.values_read: dict[str, Tensor] = {}
        self.session: str | None = None
        self.key = secrets.token_urlsafe(16)  # the same on every retry: the server keeps one session for it
        self.body: bytes | None = None  # the forward's request when packed ahead (``RemoteHandle._call``)

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        body = self.body or pack_call(self.plan, self.handle.access.label, self.key)
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
                    self._release()
                    raise
                log.info("the session is gone on the server; resending the forward to recompute")
            except InvalidInputError:  # refused (400): the session is still there
                self._release()
                raise
        if result is None:
            content = pack_recompute(self.plan, self.handle.access.label, grads)
            result = unpack_vjp(decode(self.handle._request("POST", "/v1/vjp", content=content).content), self.plan)
        self.session = None
        with self.handle._lock:  # chunks' VJPs may end on several threads at once
            self.handle.exposure.gradient_queries += 1
            self.handle.exposure.gradient_samples += self.plan.batch
        return result

    def _release(self) -> None:
        """Free this call's session after a VJP that failed (best effort: a failure here is only logged)."""
        session, self.session = self.session, None
        if session is None:
            return
        try:
            self.handle._http.post("/v1/sessions/release", json={"session": session})
        except httpx.HTTPError as err:
            log.info("could not release a session after a failed VJP (%s); the server's TTL will", err)

