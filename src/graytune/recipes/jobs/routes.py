"""OpenAI's files, fine-tuning jobs, models and embeddings routes on ``graytune serve --jobs DIR``.

- ``POST /v1/files`` (multipart: ``file``, ``purpose=fine-tune``), ``GET /v1/files``, ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}`` (409 while a job that has not finished uses it);
- ``POST /v1/fine_tuning/jobs`` (``graytune.recipes.jobs.requests``), ``GET /v1/fine_tuning/jobs``,
  ``GET .../{id}``, ``POST .../{id}/cancel|pause|resume``, ``GET .../{id}/events``, ``GET .../{id}/checkpoints``;
- ``GET /v1/models`` (the served backbone and the caller's fine-tuned models), ``GET /v1/models/{id}``;
- ``POST /v1/embeddings`` (``graytune.recipes.jobs.embeddings``): texts, or images in graytune's extension;
- ``POST /v1/completions``, ``POST /v1/chat/completions`` for a language model's jobs
  (``graytune.recipes.jobs.completions``).

A client sees only its own files, jobs and models (another client's id answers 404, as an unknown one); an admin
(``--admins``) lists every client's jobs. Lists are OpenAI's pages (``data``, ``has_more``, ``after``/``limit``).

Example:
    >>> app = create_app(handle, ServeConfig(jobs="jobs"), keys, extra=install_jobs)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response

from graytune.recipes.jobs import completions, embeddings
from graytune.recipes.jobs.files import FileStore
from graytune.recipes.jobs.requests import job_run
from graytune.recipes.jobs.runner import JobRunner
from graytune.recipes.jobs.store import ACTIVE, JobStore, public
from graytune.serve.admission import HTTPProblem
from graytune.serve.routes.dependencies import ClientDep, ServiceDep
from graytune.serve.routes.hosted import install_adapters
from graytune.serve.service import Service

__all__ = ["Jobs", "install_jobs", "router"]
router = APIRouter()


class Jobs:
    """The files, jobs and runner of one server."""

    def __init__(self, root: Path, service: Service, host: Any) -> None:
        self.files, self.store = FileStore(root, service.config), JobStore(root)
        self.runner = JobRunner(self.store, service.keys, host, service.config)

    def stats(self, client: str | None) -> dict[str, Any]:
        """``/v1/stats``'s job figures: the client's files (count, bytes), jobs by status and models, with the
        limits; for ``None`` (an admin) every client's, by client."""
        if client is not None:
            return {"jobs": self._figures(client)}
        clients = {j["graytune"]["client"] for j in self.store.listing(None)} | self.files.clients()
        return {"jobs": {name: self._figures(name) for name in sorted(clients)}}

    def _figures(self, client: str) -> dict[str, Any]:
        files, jobs = self.files.listing(client), self.store.listing(client)
        statuses: dict[str, int] = {}
        for job in jobs:
            statuses[job["status"]] = statuses.get(job["status"], 0) + 1
        config = self.runner.config
        return {"files": len(files), "file_bytes": sum(f["bytes"] for f in files), "jobs": statuses,
                "models": sum(1 for j in jobs if j.get("fine_tuned_model")),
                "limits": {"client_files": config.client_files, "client_files_mb": config.client_files_mb,
                           "client_jobs": config.client_jobs}}


def install_jobs(app: FastAPI, service: Service) -> None:
    """Add the job routes when ``--jobs DIR`` is set (and the adapter host their models are served from)."""
    config = service.config
    if not config.jobs:
        return
    if config.workers > 1:
        raise HTTPProblem(400, "invalid_input", "--jobs runs its queue in one server process; drop --workers")
    if not hasattr(app.state, "adapters"):
        install_adapters(app, service)
    jobs = Jobs(Path(config.jobs), service, app.state.adapters)
    app.state.jobs = jobs
    service.stat_sources.append(jobs.stats)
    app.state.on_start.append(jobs.runner.start)
    app.state.on_close.append(jobs.runner.close)
    app.include_router(router)
    app.include_router(embeddings.router)
    app.include_router(completions.router)


async def get_jobs(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]


# ---- files ----------------------------------------------------------------------------------------------

@router.post("/v1/files")
async def upload(request: Request, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    """Keep a training file (multipart ``file`` and ``purpose``); the OpenAI file object."""
    limit = jobs.files.max_bytes + 2**16  # the file and the form around it
    async with service.body(request, limit) as body:
        filename, purpose, data = _form(request.headers.get("content-type", ""), body)
    return _file_object(await service.checked(jobs.files.save, client, filename, purpose, data))


@router.get("/v1/files")
async def files(jobs: JobsDep, client: ClientDep, after: str | None = None, limit: int = 100) -> dict[str, Any]:
    return _page([_file_object(r) for r in jobs.files.listing(client)], after, limit)


@router.get("/v1/files/{file_id}")
async def file(file_id: str, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return _file_object(jobs.files.get(client, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, jobs: JobsDep, client: ClientDep) -> Response:
    name, data = jobs.files.content(client, file_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    jobs.files.get(client, file_id)
    using = [j["id"] for j in jobs.store.listing(client) if j["status"] in ACTIVE
             and file_id in (j["training_file"], j["validation_file"])]
    if using:
        raise HTTPProblem(409, "conflict", f"file {file_id} is used by job(s) {using} that have not finished; "
                          "cancel them or wait")
    return jobs.files.delete(client, file_id)


# ---- jobs -----------------------------------------------------------------------------------------------

@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    body = await service.json(request)
    asked = await service.checked(job_run, body, service, jobs.files, client)
    active = [j for j in jobs.store.listing(client) if j["status"] in ACTIVE]
    if len(active) >= service.config.client_jobs:
        raise HTTPProblem(429, "quota", f"you have {len(active)} jobs queued, running or paused, the most this "
                          f"server allows (--client-jobs {service.config.client_jobs}); cancel one or wait")
    jobs.runner.check_room()  # and nothing awaited from here to submit: the room is still there then
    run = asked.pop("run")
    job_id = "ftjob-" + secrets.token_hex(12)
    record = {"object": "fine_tuning.job", "id": job_id, "created_at": int(time.time()), **asked,
              "status": "validating_files", "error": None, "fine_tuned_model": None, "finished_at": None,
              "organization_id": client, "result_files": [], "trained_tokens": None, "estimated_finish": None,
              "integrations": [], "graytune": {"client": client, "access": run["access"], "method": run["method"],
                                               "options": run["options"], "train": run["train"], "run": run,
                                               "attempts": 0, "exposure": None, "result": None}}
    jobs.store.create(client, record)
    jobs.runner.submit(job_id)
    return _job(jobs, jobs.store.get(client, job_id))


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(service: ServiceDep, jobs: JobsDep, client: ClientDep, after: str | None = None,
                    limit: int = 20) -> dict[str, Any]:
    """The caller's jobs, newest first (every client's for an admin)."""
    return _page([_job(jobs, j) for j in jobs.store.listing(_who(service, client))], after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def job(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return _job(jobs, jobs.store.get(_who(service, client), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return await _act(jobs.runner.cancel, job_id, service, jobs, client)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return await _act(jobs.runner.pause, job_id, service, jobs, client)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return await _act(jobs.runner.resume, job_id, service, jobs, client)


async def _act(action: Callable[[str], None], job_id: str, service: Service, jobs: Jobs,
               client: str) -> dict[str, Any]:
    """``action`` (the runner's cancel, pause or resume: 409 when the job's status does not allow it) on the
    caller's job (404 for another's); the job as it is now."""
    jobs.store.get(_who(service, client), job_id)
    await service.checked(action, job_id)
    return _job(jobs, jobs.store.get(None, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def events(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep, after: str | None = None,
                 limit: int = 20) -> dict[str, Any]:
    """Messages and metrics (each step's loss, rate and calls; each validation), newest first."""
    jobs.store.get(_who(service, client), job_id)
    return _page(await service.checked(jobs.store.events, job_id), after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def checkpoints(job_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep, after: str | None = None,
                      limit: int = 10) -> dict[str, Any]:
    """The job's resumable checkpoint (graytune keeps one, the last whole step) or, once it succeeded, its model."""
    record = jobs.store.get(_who(service, client), job_id)
    found = await service.checked(_checkpoints, jobs.store, record)
    return _page(found, after, limit)


# ---- models and embeddings ------------------------------------------------------------------------------

@router.get("/v1/models")
async def models(service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    return {"object": "list", "data": _models(service, jobs, client)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, service: ServiceDep, jobs: JobsDep, client: ClientDep) -> dict[str, Any]:
    for found in _models(service, jobs, client):
        if found["id"] == model_id:
            return found
    raise HTTPProblem(404, "not_found", f"no model {model_id!r} among yours; GET /v1/models lists them")


# ---- helpers --------------------------------------------------------------------------------------------

def _job(jobs: Jobs, record: dict[str, Any]) -> dict[str, Any]:
    """The job object a client sees, with its place in the queue."""
    return public(record, jobs.runner.position(record["id"]))


def _who(service: Service, client: str) -> str | None:
    return None if service.is_admin(client) else client


def _form(content_type: str, body: bytes) -> tuple[str, str, bytes]:
    """The ``file`` (name, bytes) and ``purpose`` of a multipart form."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPProblem(400, "invalid_input", f"send multipart/form-data with file and purpose (got "
                          f"{content_type or 'no Content-Type'}), as client.files.create(file=..., purpose="
                          "'fine-tune') does")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    if "file" not in parts or "purpose" not in parts:
        raise HTTPProblem(400, "invalid_input", f"the form has {sorted(k for k in parts if k)}; send file and purpose")
    upload, purpose = parts["file"], parts["purpose"].get_payload(decode=True) or b""
    return upload.get_filename() or "upload", purpose.decode(errors="replace").strip(), \
        upload.get_payload(decode=True) or b""


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    if not 1 <= limit <= 1000:
        raise HTTPProblem(400, "invalid_input", f"limit is {limit}; give 1 to 1000")
    ids = [i["id"] for i in items]
    start = ids.index(after) + 1 if after in ids else 0
    page = items[start:start + limit]
    return {"object": "list", "data": page, "has_more": start + limit < len(items),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _file_object(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "graytune"} | {
        "graytune": {k: record["graytune"][k] for k in ("task", "rows", "classes")}}


def _models(service: Service, jobs: Jobs, client: str) -> list[dict[str, Any]]:
    backbone = service.handle.spec.id
    out = [{"id": backbone, "object": "model", "created": 0, "owned_by": "graytune"}]
    for record in jobs.store.listing(client):  # the models the caller can call (an admin lists jobs, not models)
        if record["status"] == "succeeded" and record["fine_tuned_model"]:
            out.append({"id": record["fine_tuned_model"], "object": "model", "created": record["finished_at"],
                        "owned_by": record["graytune"]["client"]})
    return out


def _checkpoints(store: JobStore, record: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    path = store.folder(record["id"]) / "run" / "checkpoint.pt"
    if record["status"] == "succeeded":
        result = record["graytune"]["result"] or {}
        step, best, name = result.get("best_step"), result.get("best_val"), record["fine_tuned_model"]
        at = record["finished_at"]
    elif path.is_file():
        state = torch.load(path, weights_only=True)["state"]
        step, best, at = state["step"], state.get("best"), int(path.stat().st_mtime)
        name = f"{record['model']}:{record['id']}:ckpt-step-{step}"  # resumable; not served
    else:
        return []
    return [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{record['id'][6:]}-{step}", "created_at": at,
             "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": record["id"],
             "metrics": {"step": step, "valid_best": best}, "step_number": step}]
