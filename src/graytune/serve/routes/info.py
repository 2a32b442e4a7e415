"""What a client may learn without using the backbone: health, the spec at a level, its own use.

- ``GET /v1/health`` (no key) ``{"status": "ok"}``;
- ``GET /v1/spec?access=LEVEL`` the spec visible at ``LEVEL`` (at most the granted one), and the wire
  protocol this server speaks (``protocol``, ``protocol_min``);
- ``GET /v1/stats`` the caller's own sessions and quota use (every client's for an admin).

Example:
    >>> app.include_router(info.router)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from graytune.access.wire import server_protocol
from graytune.serve.routes.dependencies import ClientDep, ServiceDep, get_client

__all__ = ["router"]
router = APIRouter()


@router.get("/v1/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/spec", dependencies=[Depends(get_client)])
async def spec(service: ServiceDep, access: str | None = None) -> dict[str, Any]:
    return {**service.spec(access), **server_protocol()}


@router.get("/v1/stats")
async def stats(service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    return service.stats(client)
