"""What a client may learn without using the backbone: health, the spec at a level, its own use.

- ``GET /v1/health`` (no key) ``{"status": "ok"}``;
- ``GET /v1/spec?access=LEVEL`` the spec visible at ``LEVEL`` (at most the granted one), and the wire
  protocol this server speaks (``protocol``, ``protocol_min``);
- ``GET /v1/check-port?name=PORT&op=add&grad=true`` whether an edit at a port is allowed at the caller's
  level: 403 naming the level for a port above it (the remote client asks when its level's spec lacks a
  port, so that it raises what the in-process handle raises);
- ``GET /v1/stats`` the caller's own sessions and quota use (every client's for an admin).

Example:
    >>> app.include_router(info.router)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from graytune.access.wire import server_protocol
from graytune.serve.refusals import check_port
from graytune.serve.routes.dependencies import ClientDep, ServiceDep, get_client

__all__ = ["router"]
router = APIRouter()


@router.get("/v1/health")
async def health() -> dict[str, str]:
    """``{"status": "ok"}`` while the server runs (no key needed)."""
    return {"status": "ok"}


@router.get("/v1/spec", dependencies=[Depends(get_client)])
async def spec(service: ServiceDep, access: str | None = None) -> dict[str, Any]:
    """The backbone's spec at ``access`` (at most the granted level), the reads granted, the placement, the
    body limit and the wire protocol versions this server speaks."""
    return {**service.spec(access), **server_protocol()}


@router.get("/v1/check-port", dependencies=[Depends(get_client)])
async def check_port_route(service: ServiceDep, name: str, op: str = "add", grad: bool = False,
                           access: str | None = None) -> dict[str, bool]:
    """Whether ``op`` (add, insert, read) at the port ``name``, with gradients if ``grad``, is allowed at ``access``.

    The remote client asks this when a port is not in the spec of its level, so that a port above that level
    is refused as in process: 403 naming the level it needs (a port that does not exist: 400 ``unknown_name``).
    Nothing runs and nothing is charged.
    """
    check_port(service.level_handle(access), name, op, grad)
    return {"allowed": True}


@router.get("/v1/stats")
async def stats(service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    """The caller's own sessions and quota use (every client's for an admin)."""
    return service.stats(client)
