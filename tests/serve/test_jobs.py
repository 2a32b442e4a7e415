"""``graytune serve --jobs``: OpenAI's files, fine-tuning jobs, models and embeddings routes, driven by the
unmodified ``openai`` SDK against one MiniLM server at dark-gray (issue 29's "done means").

One server serves the whole module, so its jobs run one after another (one job worker); each job trains a few
steps on a few dozen short texts, in a training process of its own that trains through this server.
"""

from __future__ import annotations

import csv
import io
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import graytune  # noqa: E402
from graytune.access import LocalHandle  # noqa: E402
from graytune.artifacts import load_adapter  # noqa: E402
from graytune.recipes.jobs.routes import install_jobs  # noqa: E402
from graytune.serve import ApiKeys, ServeConfig, create_app  # noqa: E402
from graytune.serve.runner import BackgroundServer  # noqa: E402
from tests.serve.conftest import ALICE, BOB, KEYS  # noqa: E402

OWNER = "owner-key-0123456789abcdef"
TOPICS = {"sports": ["the team won the final match", "she ran a marathon in record time", "the keeper saved a penalty",
                     "he scored three goals tonight", "the tennis final went to five sets",
                     "the coach praised the defence", "a late goal sealed the cup",
                     "the cyclist took the yellow jersey"],
          "cooking": ["simmer the onions until golden", "bake the bread for forty minutes", "add salt to taste",
                      "whisk the eggs with sugar", "grill the fish over hot coals", "knead the dough for ten minutes",
                      "roast the peppers in the oven", "stir the soup and let it rest"],
          "weather": ["heavy rain is expected tomorrow", "a cold front brings snow", "sunny skies all weekend",
                      "strong winds toppled trees", "fog will clear by noon", "a heatwave grips the south",
                      "thunderstorms roll in tonight", "frost on the fields at dawn"],
          "music": ["the orchestra played a symphony", "she sang the ballad beautifully", "the guitar solo was loud",
                    "a new album drops on friday", "the drummer kept steady time", "the choir rehearsed all evening",
                    "the pianist played a nocturne", "the band toured the coast"]}
#: 64 labelled texts (each sentence, and again with a few words after it)
ROWS = [(f"{text}{tail}", label) for tail in ("", " this week") for label, texts in TOPICS.items() for text in texts]
QUERIES = ["a striker scores", "bake a cake", "rain all day", "a jazz trio", "x"]
FINISHED = ("succeeded", "failed", "cancelled")
SMALL = {"max_steps": 6, "batch_size": 8, "eval_every": 3}
PAUSABLE = {"max_steps": 20, "batch_size": 4, "eval_every": 5}


def rows_csv(rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


@dataclass
class Served:
    url: str
    app: Any
    handle: LocalHandle
    root: Path  # the --jobs folder

    def client(self, key: str = ALICE) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def run_folder(self, job_id: str) -> Path:
        return self.app.state.jobs.store.folder(job_id) / "run"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served") / "jobs"
    handle = graytune.open_backbone("minilm", "dark-gray")
    config = ServeConfig(access="dark-gray", jobs=str(root), admins=("owner",), max_file_mb=0.02)
    app = create_app(handle, config, ApiKeys({**KEYS, "owner": OWNER}), extra=install_jobs)
    server = BackgroundServer(app)
    url = server.start()
    yield Served(url, app, handle, root)
    server.stop()


@pytest.fixture(scope="module")
def train_file(served: Served) -> Any:
    return served.client().files.create(file=("topics.csv", rows_csv(ROWS), "text/csv"), purpose="fine-tune")


@pytest.fixture(scope="module")
def trained(served: Served, train_file: Any) -> Any:
    """Alice's job of a few steps, finished."""
    client = served.client()
    job = client.fine_tuning.jobs.create(model="minilm", training_file=train_file.id, seed=3, hyperparameters=SMALL)
    assert job.status in ("queued", "running") and job.seed == 3
    return wait(client, job.id)


def wait(client: Any, job_id: str, until: tuple[str, ...] = FINISHED, timeout_s: float = 300) -> Any:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.3)
    pytest.fail(f"job {job_id} is still {job.status} after {timeout_s} s; events: {messages(client, job_id)}")


def events(client: Any, job_id: str) -> list[Any]:
    """The job's events, oldest first."""
    return client.fine_tuning.jobs.list_events(job_id, limit=1000).data[::-1]


def messages(client: Any, job_id: str) -> list[str]:
    return [e.message for e in events(client, job_id)]


def steps(client: Any, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's training-step metrics events, oldest first."""
    return [e.data for e in events(client, job_id) if e.type == "metrics" and "train_loss" in e.data]


def wait_for_a_step(client: Any, job_id: str, timeout_s: float = 240) -> None:
    """Until the job's process logged a step (so it listens for pause and SIGTERM: ``fit`` is under way)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if steps(client, job_id):
            return
        assert client.fine_tuning.jobs.retrieve(job_id).status in ("queued", "running")
        time.sleep(0.2)
    pytest.fail(f"job {job_id} logged no step in {timeout_s} s")


def test_a_job_trains_and_its_model_embeds_as_its_artifact_does(served: Served, train_file: Any,
                                                                trained: Any) -> None:
    client = served.client()
    assert train_file.graytune == {"task": "classification", "rows": 64, "classes": sorted(TOPICS)}
    assert client.files.content(train_file.id).content == rows_csv(ROWS)
    job = trained
    assert job.status == "succeeded" and job.error is None, messages(client, job.id)
    assert job.fine_tuned_model == f"ft:minilm:dga:alice:{job.id.removeprefix('ftjob-')}"
    assert re.fullmatch(r"ft:minilm:dga:alice:[0-9a-f]{24}", job.fine_tuned_model)
    assert job.graytune["train"]["max_steps"] == 6 and job.graytune["train"]["seed"] == 3

    seen = events(client, job.id)
    metrics = [e for e in seen if e.type == "metrics"]
    step_numbers = [e.data["step"] for e in metrics if "train_loss" in e.data]
    assert step_numbers == list(range(1, 7))
    assert all(isinstance(e.data["train_loss"], float) for e in metrics if "train_loss" in e.data)
    validations = [e.data for e in metrics if "valid_primary" in e.data]
    assert [v["step"] for v in validations] == [3, 6]
    assert all(v["valid_primary"] == "accuracy" and 0 <= v["valid_accuracy"] <= 1 for v in validations)
    assert seen[0].message.startswith("Created fine-tuning job") and "successfully completed" in seen[-1].message

    model_ids = [m.id for m in client.models.list()]
    assert model_ids == ["minilm", job.fine_tuned_model]

    model = load_adapter(str(served.run_folder(job.id)), served.handle).eval()
    with torch.no_grad():
        local = model.encode_text(QUERIES)  # [5, 384]
        base = served.handle.encode_text(served.handle.tokenize(QUERIES))
    answer = client.embeddings.create(model=job.fine_tuned_model, input=QUERIES)  # base64, the SDK's default
    assert [d.index for d in answer.data] == list(range(len(QUERIES))) and answer.model == job.fine_tuned_model
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(QUERIES)
    served_b64 = torch.tensor([d.embedding for d in answer.data])
    torch.testing.assert_close(served_b64, local, rtol=1e-5, atol=1e-5)
    floats = client.embeddings.create(model=job.fine_tuned_model, input=QUERIES, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in floats.data]), local, rtol=1e-5, atol=1e-5)
    one = client.embeddings.create(model=job.fine_tuned_model, input="bake a cake")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), local[1], rtol=1e-4, atol=1e-5)
    plain = client.embeddings.create(model="minilm", input=QUERIES, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in plain.data]), base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(local, base, atol=1e-3)  # the job's model is not the backbone

    reply = httpx.post(f"{served.url}/v1/adapters/{job.fine_tuned_model}/embed", json={"texts": QUERIES},
                       headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    assert reply.status_code == 200, reply.text
    torch.testing.assert_close(torch.tensor(reply.json()["embeds"]), local, rtol=1e-5, atol=1e-5)


def test_the_job_reports_what_its_training_exposed(served: Served, trained: Any) -> None:
    client = served.client()
    exposure = trained.graytune["exposure"]
    calls = exposure["calls"]
    assert exposure["access"] == "dark-gray" == trained.graytune["access"]
    assert exposure["gradient_queries"] > 0 and exposure["gradient_samples"] > 0
    assert exposure["gradient_queries"] <= calls["train"] and exposure["forward_queries"] >= calls["train"] > 0
    # every forward the training process sent is one of the run's counted calls, and the other way round
    assert exposure["forward_queries"] == calls["train"] + calls["val"] + calls["test"]
    assert exposure["forward_samples"] == calls["train_samples"] + calls["val_samples"] + calls["test_samples"]
    assert "add" in exposure["ports"]["text.token_embeds"]  # DGA's edit, at the port the method adapts
    last = steps(client, trained.id)[-1]  # no gradient is taken after the last step (validation is forward only)
    assert last["gradient_queries"] == exposure["gradient_queries"]
    assert last["forward_queries"] <= exposure["forward_queries"]
    assert trained.graytune["result"]["steps"] == 6


def test_another_client_reaches_none_of_alices_files_jobs_or_models(served: Served, train_file: Any,
                                                                    trained: Any) -> None:
    alice, bob, owner = served.client(), served.client(BOB), served.client(OWNER)
    ft = trained.fine_tuned_model
    for call in (lambda: bob.files.retrieve(train_file.id), lambda: bob.files.content(train_file.id),
                 lambda: bob.files.delete(train_file.id), lambda: bob.fine_tuning.jobs.retrieve(trained.id),
                 lambda: bob.fine_tuning.jobs.cancel(trained.id), lambda: bob.fine_tuning.jobs.pause(trained.id),
                 lambda: bob.fine_tuning.jobs.resume(trained.id), lambda: bob.fine_tuning.jobs.list_events(trained.id),
                 lambda: bob.fine_tuning.jobs.checkpoints.list(trained.id), lambda: bob.models.retrieve(ft)):
        with pytest.raises(openai.NotFoundError):
            call()
    # alice's model answers bob as a model that does not exist does, on either route that embeds
    answers: dict[str, list[int]] = {"embeddings": [], "adapters": []}
    for model in (ft, "ft:minilm:dga:bob:000000000000000000000000"):
        with pytest.raises(openai.APIStatusError) as refused:
            bob.embeddings.create(model=model, input=["a cat"])
        assert model in str(refused.value) and "alice" not in str(refused.value).replace(model, "")
        reply = httpx.post(f"{served.url}/v1/adapters/{model}/embed", json={"texts": ["a cat"]},
                           headers={"Authorization": f"Bearer {BOB}"}, timeout=60)
        assert "alice" not in reply.text.replace(model, "")
        answers["embeddings"].append(refused.value.status_code)
        answers["adapters"].append(reply.status_code)
    assert answers["embeddings"] == [404, 404]
    assert answers["adapters"][0] == answers["adapters"][1] and 400 <= answers["adapters"][0] < 500
    adapters = httpx.get(f"{served.url}/v1/adapters", headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
    assert adapters.status_code == 200 and ft not in adapters.json()

    assert [m.id for m in bob.models.list()] == ["minilm"]
    assert train_file.id not in [f.id for f in bob.files.list()]
    assert trained.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    # nothing bob tried changed alice's file or job
    assert alice.files.retrieve(train_file.id).id == train_file.id
    assert alice.fine_tuning.jobs.retrieve(trained.id).status == "succeeded"
    assert ft in [m.id for m in alice.models.list()]

    everyone = [j.id for j in owner.fine_tuning.jobs.list(limit=100)]  # an admin lists every client's jobs
    assert trained.id in everyone
    assert owner.fine_tuning.jobs.retrieve(trained.id).graytune["exposure"] == trained.graytune["exposure"]


@pytest.fixture(scope="module")
def paused_and_not(served: Served, train_file: Any) -> tuple[Any, Any]:
    """Two jobs of one seed and settings: the first paused once it logged a step, then resumed; both finished."""
    client = served.client()
    paused = client.fine_tuning.jobs.create(model="minilm", training_file=train_file.id, seed=11,
                                            hyperparameters=PAUSABLE, suffix="paused")
    wait_for_a_step(client, paused.id)
    asked = client.fine_tuning.jobs.pause(paused.id)
    assert asked.status in ("pausing", "paused")
    held = wait(client, paused.id, until=("paused", *FINISHED))
    assert held.status == "paused", messages(client, paused.id)
    assert held.fine_tuned_model is None
    checkpoints = client.fine_tuning.jobs.checkpoints.list(paused.id).data
    assert len(checkpoints) == 1
    at = checkpoints[0].step_number
    assert 1 <= at < PAUSABLE["max_steps"] and checkpoints[0].fine_tuning_job_id == paused.id
    assert f"Paused after step {at}" in messages(client, paused.id)[-1]
    assert len(steps(client, paused.id)) == at  # it stopped where it checkpointed
    with pytest.raises(openai.ConflictError):  # a paused job cannot be paused again
        client.fine_tuning.jobs.pause(paused.id)

    never = client.fine_tuning.jobs.create(model="minilm", training_file=train_file.id, seed=11,
                                           hyperparameters=PAUSABLE)
    assert client.fine_tuning.jobs.resume(paused.id).status in ("queued", "running")
    a, b = wait(client, paused.id), wait(client, never.id)
    assert a.status == b.status == "succeeded", (messages(client, paused.id), messages(client, never.id))
    return a, b


def test_a_paused_and_resumed_job_trains_bit_for_bit_as_one_never_paused(served: Served,
                                                                         paused_and_not: tuple[Any, Any]) -> None:
    client, (a, b) = served.client(), paused_and_not
    assert a.fine_tuned_model.endswith(":paused") and a.graytune["result"]["steps"] == PAUSABLE["max_steps"]
    assert [s["step"] for s in steps(client, a.id)] == list(range(1, PAUSABLE["max_steps"] + 1))
    assert [s["train_loss"] for s in steps(client, a.id)] == [s["train_loss"] for s in steps(client, b.id)]
    resumed = load_file(served.run_folder(a.id) / "adapter_model.safetensors")
    straight = load_file(served.run_folder(b.id) / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys() and resumed
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert a.graytune["exposure"]["calls"] == b.graytune["exposure"]["calls"]  # the run's calls, counted as one run's


def test_a_resumed_jobs_exposure_counts_every_query_its_processes_made(paused_and_not: tuple[Any, Any]) -> None:
    a, b = paused_and_not
    calls = a.graytune["exposure"]["calls"]
    assert a.graytune["exposure"]["forward_queries"] >= calls["train"] + calls["val"] + calls["test"]
    assert a.graytune["exposure"]["gradient_queries"] >= b.graytune["exposure"]["gradient_queries"]


def test_cancelled_jobs_stop_and_make_no_model(served: Served, train_file: Any) -> None:
    client = served.client()
    running = client.fine_tuning.jobs.create(model="minilm", training_file=train_file.id, seed=5,
                                             hyperparameters=PAUSABLE)
    queued = client.fine_tuning.jobs.create(model="minilm", training_file=train_file.id, seed=5,
                                            hyperparameters=SMALL)
    assert queued.status == "queued" and queued.graytune["queue_position"] >= 1  # one job runs at a time
    done = client.fine_tuning.jobs.cancel(queued.id)
    assert done.status == "cancelled" and done.fine_tuned_model is None and done.finished_at is not None

    wait_for_a_step(client, running.id)
    assert client.fine_tuning.jobs.retrieve(running.id).status == "running"
    client.fine_tuning.jobs.cancel(running.id)
    stopped = wait(client, running.id)
    assert stopped.status == "cancelled" and stopped.fine_tuned_model is None, messages(client, running.id)
    assert len(steps(client, running.id)) < PAUSABLE["max_steps"]
    assert not (served.run_folder(running.id) / "adapter_model.safetensors").exists()
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(running.id)
    ids = [m.id for m in client.models.list()]
    assert not [i for i in ids if running.id[6:] in i or queued.id[6:] in i]
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"


def test_bad_files_and_job_requests_are_refused_and_the_server_still_serves(served: Served, train_file: Any) -> None:
    client = served.client(BOB)

    def refused(kind: type, name: str, data: bytes) -> str:
        with pytest.raises(kind) as err:
            client.files.create(file=(name, data), purpose="fine-tune")
        text = str(err.value)
        assert str(served.root) not in text and "upload." not in text  # the client's names, not the server's paths
        return text

    text = refused(openai.BadRequestError, "columns.csv", rows_csv([("1", "2"), ("3", "4")], header=("foo", "bar")))
    assert "columns.csv" in text and "'text' and 'label'" in text and "['foo', 'bar']" in text
    text = refused(openai.BadRequestError, "notes.txt", b"just some text\n")
    assert "notes.txt" in text and ".csv" in text and ".jsonl" in text and ".zip" in text
    big = rows_csv(ROWS * 20)
    assert len(big) > 0.02 * 2**20
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.csv", big), purpose="fine-tune")
    assert err.value.status_code == 413 and "--max-file-mb" in str(err.value)

    images = rows_csv([("red.png", "red"), ("blue.png", "blue")], header=("image", "label"))
    ok = client.files.create(file=("images.zip", zipped({"rows.csv": images, "red.png": png(), "blue.png": png()})),
                             purpose="fine-tune")
    assert ok.graytune["task"] == "classification" and ok.graytune["classes"] == ["blue", "red"]
    text = refused(openai.BadRequestError, "missing.zip", zipped({"rows.csv": images, "red.png": png()}))
    assert "missing.zip" in text and "missing" in text.replace("missing.zip", "") and "blue.png" in text
    text = refused(openai.BadRequestError, "escape.zip",
                   zipped({"rows.csv": rows_csv(ROWS), "../../../../../escape.csv": rows_csv(ROWS)}))
    assert "outside its folder" in text and "../../../../../escape.csv" in text
    assert not list(served.root.parent.rglob("escape.csv"))

    def create(**fields: Any) -> str:
        own = client.files.create(file=("mine.csv", rows_csv(ROWS[:40])), purpose="fine-tune") \
            if "training_file" not in fields else None
        with pytest.raises(openai.APIStatusError) as err:
            client.fine_tuning.jobs.create(**{"model": "minilm", "training_file": own and own.id, **fields})
        return f"{err.value.status_code} {err.value}"

    text = create(hyperparameters={"n_epochs": 1, "learning_rate": 0.1})
    assert text.startswith("400") and "['learning_rate']" in text and "n_epochs" in text and "max_steps" in text
    text = create(method={"type": "dgaa"})
    assert text.startswith("400") and "unknown method 'dgaa'; did you mean 'dga'" in text and "lora" in text
    text = create(method={"type": "lga"})
    assert text.startswith("403") and "light-gray" in text and "dark-gray" in text
    text = create(training_file=train_file.id)  # alice's file, named by bob
    assert text.startswith("404") and train_file.id in text
    assert client.fine_tuning.jobs.list().data == []  # none of these made a job

    assert httpx.get(f"{served.url}/v1/health", timeout=30).status_code == 200
    names = {f.filename for f in client.files.list()}
    assert names == {"images.zip", "mine.csv"}  # what was refused was not kept
    assert not [p for p in served.root.rglob("*") if p.name.startswith(".file-")]  # nor half-kept
