"""Fine-tuning jobs on a language model (issue 29 item 3): a prompt/completion file trains a soft prompt through
the server, and its model id answers OpenAI's /v1/completions with what the same artifact generates in process.
The backbone is a tiny random Llama the test builds (mechanics only, never quality)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import graytune
from graytune.artifacts import load_adapter
from graytune.recipes.jobs.routes import install_jobs
from graytune.types import GenerationSettings
from tests.backbones.tiny_causal import build_tiny_causal
from tests.serve.conftest import ALICE, BOB
from tests.serve.test_jobs import wait

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> graytune.access.LocalHandle:
    folder = build_tiny_causal(tmp_path_factory.mktemp("llama"), "llama", seed=1)
    return graytune.open_backbone(f"hf-causal:{folder}", "dark-gray")


def test_a_language_model_job_serves_completions_equal_to_its_artifact_in_process(serve, llama, tmp_path: Path):  # type: ignore[no-untyped-def]
    url, app = serve(handle=llama, access="dark-gray", reads=(), jobs=str(tmp_path / "jobs"), extra=install_jobs,
                     max_new_tokens=32)
    alice = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"the cat {i} sat", "completion": " on the mat"}) + "\n"
                            for i in range(40)))
    upload = alice.files.create(file=rows.open("rb"), purpose="fine-tune")
    assert upload.graytune["task"] == "generation" and upload.graytune["rows"] == 40
    job = alice.fine_tuning.jobs.create(model=llama.spec.id, training_file=upload.id, seed=3,
                                        method={"type": "prompt"}, hyperparameters={"max_steps": 3, "batch_size": 8})
    job = wait(alice, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{llama.spec.id}:prompt:alice:")

    answer = alice.completions.create(model=job.fine_tuned_model, prompt=["the cat 3 sat", "a dog"], max_tokens=5,
                                      temperature=0)
    model = load_adapter(str(app.state.jobs.store.folder(job.id) / "run"), llama)
    want = model.generate(["the cat 3 sat", "a dog"], GenerationSettings(max_new_tokens=5, temperature=0.0))
    assert [c.text for c in answer.choices] == want.texts
    assert answer.usage.completion_tokens == int(want.lengths.sum())
    plain = alice.completions.create(model=llama.spec.id, prompt="the cat 3 sat", max_tokens=5, temperature=0)
    zero = llama.generate({"text": ["the cat 3 sat"]}, settings=GenerationSettings(max_new_tokens=5))
    assert plain.choices[0].text == zero.texts[0]  # the backbone's own id: no adapter

    with pytest.raises(openai.BadRequestError, match="publishes no chat template"):
        alice.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n=2 is not served"):
        alice.completions.create(model=job.fine_tuned_model, prompt="a", n=2)
    with pytest.raises(openai.APIStatusError, match="--max-new-tokens") as big:
        alice.completions.create(model=job.fine_tuned_model, prompt="a", max_tokens=33)
    assert big.value.status_code == 413
    bob = openai.OpenAI(base_url=url + "/v1", api_key=BOB, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no model"):
        bob.completions.create(model=job.fine_tuned_model, prompt="a", max_tokens=2)
    assert [m.id for m in bob.models.list()] == [llama.spec.id]


def test_stats_count_a_clients_files_and_jobs(serve, llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    url, _ = serve(handle=llama, access="dark-gray", reads=(), jobs=str(tmp_path / "jobs"), extra=install_jobs,
                   admins=("bob",))
    alice = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(12)))
    upload = alice.files.create(file=rows.open("rb"), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(model=llama.spec.id, training_file=upload.id, method={"type": "prompt"},
                                        hyperparameters={"max_steps": 200, "batch_size": 4})
    alice.fine_tuning.jobs.cancel(job.id)
    mine = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {ALICE}"}).json()["jobs"]
    assert mine["files"] == 1 and mine["file_bytes"] == upload.bytes and mine["limits"]["client_jobs"] == 8
    assert sum(mine["jobs"].values()) == 1 and set(mine["jobs"]) <= {"cancelled", "running", "queued"}
    every = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {BOB}"}).json()["jobs"]
    assert set(every) == {"alice"} and every["alice"]["files"] == 1  # an admin sees each client's


def test_a_full_queue_refuses_a_job_and_keeps_no_half_made_one(serve, llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, _ = serve(handle=llama, access="dark-gray", reads=(), jobs=str(tmp_path / "jobs"), extra=install_jobs,
                   job_queue=0)
    alice = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(12)))
    upload = alice.files.create(file=rows.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError, match="--job-queue 0"):
        alice.fine_tuning.jobs.create(model=llama.spec.id, training_file=upload.id, method={"type": "prompt"})
    assert list(alice.fine_tuning.jobs.list()) == []
