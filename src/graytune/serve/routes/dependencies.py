"""Typed dependencies of the routes: the app's ``Service`` and the client a request's key names.

Both are ``async`` so that they run on the event loop: a route that never waits for the backbone
(health, spec, stats, releases) never waits for a thread either.

Example:
    >>> @router.get("/v1/stats")
    ... async def stats(service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    ...     return service.stats(client)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from graytune.serve.service import Service

__all__ = ["ClientDep", "ServiceDep", "get_client", "get_service"]


async def get_service(request: Request) -> Service:
    """The service ``create_app`` built for this app."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


#: declares the key scheme on the OpenAPI page; the key itself is checked by ``Service.client``
_BEARER = HTTPBearer(auto_error=False, description="the API key the server's owner gave you")


async def get_client(request: Request, service: ServiceDep,
                     _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None) -> str:
    """The client named by the request's ``Authorization: Bearer KEY`` (401 without a valid key)."""
    return service.client(request)


ClientDep = Annotated[str, Depends(get_client)]
