"""``graytune serve``: lend a backbone you hold to many clients over HTTP, at a level you choose."""

from __future__ import annotations

import argparse
from dataclasses import fields

from graytune.config import field_docs


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.serve.config import BLACK_BOX_EDITS, DUPLICATE_ROWS, ServeConfig

    p = sub.add_parser("serve", help="serve a backbone behind the boundary (FastAPI + uvicorn)",
                       description="Clients open it with graytune.open_backbone('http://HOST:PORT', api_key=...) "
                                   "or --backbone http://HOST:PORT (key in $GRAYTUNE_API_KEY). Other clients: the "
                                   "routes are described at http://HOST:PORT/docs (OpenAPI) and in "
                                   "docs/http-api.md. Refused and failed requests (401, 403, 413, 429, 5xx) are "
                                   "logged by client name; graytune -v serve logs every request.")
    p.add_argument("backbone", help="backbone id, e.g. minilm or bridge:efficientnet-lite0+minilm")
    p.add_argument("--api-keys", required=True, metavar="FILE",
                   help="lines of 'client-name secret-key' (keys of at least 16 characters)")
    p.add_argument("--ray", type=int, default=0, metavar="REPLICAS",
                   help="run as a Ray Serve deployment with this many replicas (needs graytune[ray])")
    docs = field_docs(ServeConfig)
    for f in fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("reads", "admins"):
            p.add_argument(flag, nargs="*", default=(), help=docs[f.name])
        elif f.name == "adapters":
            p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=FOLDER",
                           help=docs[f.name] + " Repeat for several.")
        elif f.name == "recompute":
            p.add_argument(flag, action="store_true", help=docs[f.name])
        elif f.name == "access":
            p.add_argument(flag, default=f.default, choices=["black-box", "dark-gray", "light-gray"],
                           help=f"{docs[f.name]} (default: {f.default})")
        elif f.name in ("duplicate_rows", "black_box_edits"):
            p.add_argument(flag, default=f.default, choices=DUPLICATE_ROWS if f.name == "duplicate_rows"
                           else BLACK_BOX_EDITS, help=f"{docs[f.name]} (default: {f.default})")
        else:
            shown = f" (default: {f.default})" if f.default != "" else ""  # an empty default is said in the doc
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{docs.get(f.name, '')}{shown}")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.errors import InvalidInputError
    from graytune.serve.config import ApiKeys, ServeConfig

    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig)}
    config = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    keys = ApiKeys.load(args.api_keys)  # a bad key file fails before anything starts or prints
    if args.ray:
        if config.jobs:
            raise InvalidInputError("--jobs is served by graytune serve's own server; drop --ray or --jobs")
        from graytune.serve.ray_app import serve_on_ray

        serve_on_ray(args.backbone, config, args.api_keys, replicas=args.ray)
        return 0
    from graytune.serve.runner import serve_forever, start

    extra = None
    if config.jobs:
        if config.workers > 1:
            raise InvalidInputError("--jobs runs its job queue in one server process; drop --workers "
                                    f"{config.workers} (or serve jobs from a server of their own)")
        from graytune.recipes.jobs.routes import install_jobs

        extra = install_jobs
    started = start(args.backbone, config, keys, extra)  # binds the port and checks every option: the banner comes after
    edits = f"; black-box edits: {config.black_box_edits}" if config.access == "black-box" else ""
    workers = f", {config.workers} workers" if config.workers > 1 else ""
    print(f"graytune serve: {args.backbone} at {config.access} on {started.url} ({started.device}, {started.dtype}"
          f"{', recompute' if config.recompute else ''}{workers}{edits})", flush=True)
    serve_forever(started, access_log=getattr(args, "verbose", False))
    return 0
