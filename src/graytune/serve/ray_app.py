"""The same service as a Ray Serve deployment: replicas, and back-pressure when they are busy.

Each replica builds the ordinary app (``build_app``) at start-up and keeps its own
sessions; a VJP that lands on another replica gets 410 and the client recomputes,
exactly as with several uvicorn workers. Ray answers 503 when every replica has
``max_ongoing`` requests and ``max_queued`` more wait; the client retries those with
back-off. Needs ``pip install graytune[ray]``.

Example:
    >>> serve_on_ray("minilm", ServeConfig(access="dark-gray"), "keys.txt", replicas=2)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from graytune.errors import MissingDependencyError
from graytune.serve.config import ApiKeys, ServeConfig


class GraytuneReplica:
    """One replica: the settings to build the app from, on the replica's own process."""

    def __init__(self, backbone_id: str, settings: dict[str, Any], keys_file: str) -> None:
        self.backbone_id, self.settings, self.keys_file = backbone_id, settings, keys_file

    def __serve_build_asgi_app__(self) -> Any:
        from graytune.serve.runner import build_app

        config = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items()})
        return build_app(self.backbone_id, config, ApiKeys.load(self.keys_file, check_mode=False))


def ray_application(backbone_id: str, config: ServeConfig, keys_file: str, replicas: int = 2,
                    max_ongoing: int = 4, max_queued: int = 32) -> Any:
    """A bound Ray Serve application lending ``backbone_id`` with ``replicas`` replicas."""
    serve = _ray_serve()
    ApiKeys.load(keys_file)  # a bad key file fails here, not on every replica
    deployment = serve.deployment(name="graytune", num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                  max_queued_requests=max_queued)(serve.ingress()(GraytuneReplica))
    return deployment.bind(backbone_id, asdict(config), str(Path(keys_file).resolve()))


def serve_on_ray(backbone_id: str, config: ServeConfig, keys_file: str, replicas: int = 2,
                 blocking: bool = True, max_ongoing: int = 4, max_queued: int = 32) -> str:
    """Start Ray locally (or join ``RAY_ADDRESS``), run the app, and return its URL."""
    serve = _ray_serve()
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(ray_application(backbone_id, config, keys_file, replicas, max_ongoing, max_queued), name="graytune",
              route_prefix="/", blocking=blocking)
    return f"http://{config.host}:{config.port}"


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError as err:  # ray missing, or installed without its serve extra
        raise MissingDependencyError("Ray Serve is not installed; pip install 'graytune[ray]' "
                                     "(or make test-scale, which installs it)") from err
    return serve
