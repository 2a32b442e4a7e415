"""Zeroth-order training: unbiased estimators, exact call budgets, and never a VJP at black-box."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from graytune import AccessDeniedError, InvalidInputError
from graytune.adapters import zo_parameters
from graytune.methods import METHODS
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.train.tasks import ClassificationTask
from graytune.train.trainer import TrainConfig, calls_curve, fit
from graytune.train.zeroth import ESTIMATORS, ZerothOrder, ZOSettings
from tests.serve.conftest import ALICE, minilm, serve  # noqa: F401 - fixtures for the served run
from tests.train.test_trainer import Interrupt, StopAfter, toy_texts

# ---- the estimators: their expectation is the gradient -------------------------------------------------


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Thousands of tiny evaluations: one thread avoids waking a pool for each (20x faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def average_estimate(zo: ZerothOrder, loss_of, draws: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The mean of ``draws`` one-step estimates (each over ``q`` directions), in the space stepped."""
    total = None
    for step in range(draws):
        zo.accumulate(loss_of, step)
        estimate, zo.pending = zo.pending, None
        total = estimate if total is None else total + estimate
    assert total is not None
    return total / draws


def assert_matches(estimate: torch.Tensor, truth: torch.Tensor, tolerance: float) -> None:
    """Within ``tolerance`` of ``truth`` relative to its norm (the estimators' noise falls as 1/√draws)."""
    error = float((estimate - truth).norm() / truth.norm())
    assert error < tolerance, f"relative error {error:.3f} (estimate {estimate[:4]}, truth {truth[:4]})"


@pytest.mark.parametrize("estimator", ["spsa", "spsa-gc", "mezo"])  # zip: tests/train/test_zip.py
def test_expectation_is_the_gradient_of_a_quadratic(estimator: str, one_thread) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    d = 12
    root = torch.randn(d, d, generator=g)
    a, b = root @ root.T / d + torch.eye(d), torch.randn(d, generator=g)
    theta = torch.nn.Parameter(torch.randn(d, generator=g), requires_grad=False)

    def loss() -> torch.Tensor:
        return 0.5 * theta @ a @ theta + b @ theta

    truth = a @ theta.detach() + b  # the exact gradient
    zo = ZerothOrder({"theta": theta}, ZOSettings.resolve(estimator, q=20), seed=1)
    before = theta.detach().clone()
    estimate = average_estimate(zo, loss, draws=300)
    assert torch.equal(theta.detach(), before), "θ must be restored exactly after the perturbed evaluations"
    assert_matches(estimate, truth, tolerance=0.12)


@pytest.mark.parametrize("estimator", ["spsa", "mezo"])
def test_expectation_is_the_gradient_of_a_tiny_network(estimator: str, one_thread) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    theta = torch.nn.Parameter(0.5 * torch.randn(26, generator=g), requires_grad=False)  # a 3-4-2 tanh network

    def loss(t: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(x @ t[:12].view(3, 4) + t[12:16])  # [16, 4]
        return F.cross_entropy(hidden @ t[16:24].view(4, 2) + t[24:], y)

    truth = torch.func.grad(loss)(theta.detach())  # backprop, for reference
    zo = ZerothOrder({"theta": theta}, ZOSettings.resolve(estimator, q=40, eps=1e-3), seed=2)
    estimate = average_estimate(zo, lambda: loss(theta), draws=150)
    assert_matches(estimate, truth, tolerance=0.12)
    assert F.cosine_similarity(estimate, truth, dim=0) > 0.99


def test_gradient_correction_follows_blackvip() -> None:
    theta = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    gc = ZerothOrder({"theta": theta}, ZOSettings.resolve("spsa-gc", momentum=0.5))
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 1.0])
    gc.pending = first.clone()
    gc.write_grads()
    torch.testing.assert_close(theta.grad, first + 0.5 * first)  # m = ĝ at the first step; ĝ + βm stepped
    gc.after_step()
    gc.pending = torch.full((3,), 7.0)
    gc.write_grads()
    gc.discard()  # a step cut short leaves the momentum as it was
    gc.pending = second.clone()
    gc.write_grads()
    torch.testing.assert_close(theta.grad, second + 0.5 * (0.5 * first + second))


def test_bad_settings_are_refused_with_what_is_allowed() -> None:
    with pytest.raises(InvalidInputError, match="zo must be one of spsa, spsa-gc, zip, mezo.*did you mean 'spsa'"):
        TrainConfig(zo="spsaa")
    with pytest.raises(InvalidInputError, match="zo_dim .* is for zo=zip; zo is spsa-gc"):
        TrainConfig(zo_dim=8)
    with pytest.raises(InvalidInputError, match="zo_momentum .* is for zo=spsa-gc; zo is mezo"):
        TrainConfig(zo="mezo", zo_momentum=0.9)
    with pytest.raises(InvalidInputError, match="zo_q must be >= 1"):
        TrainConfig(zo_q=0)
    with pytest.raises(InvalidInputError, match="requires_grad off"):
        ZerothOrder({"w": torch.nn.Parameter(torch.zeros(2))}, ZOSettings.resolve())
    assert set(ESTIMATORS) == {"spsa", "spsa-gc", "zip", "mezo"}


# ---- the methods and the trainer --------------------------------------------------------------------------


def zo_model(tiny_clip_dir, method: str = "dga-zo", level: str = "black-box") -> AdaptedModel:  # type: ignore[no-untyped-def]
    return AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", level, method), method)


def state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state().items()}


def test_zeroth_order_methods_are_black_box_and_never_ask_for_a_vjp(tiny_clip_dir) -> None:
    assert METHODS["dga-zo"].min_access.label == "black-box" and METHODS["prompt-zo"].min_access.label == "black-box"
    model = zo_model(tiny_clip_dir)
    zo_names = set(zo_parameters(model))
    assert zo_names and all(not p.requires_grad for p in zo_parameters(model).values())
    graded = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zo_count = sum(p.numel() for p in zo_parameters(model).values())
    assert model.trainable_parameters() == graded + zo_count  # the tensors trained without a gradient count too
    owner = {k: v.clone() for k, v in model.handle._backbone.module().state_dict().items()}  # test-side only
    before = state(model)
    result = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
                 TrainConfig(lr=1e-2, batch_size=4, max_steps=3, zo="spsa", zo_q=2), progress=False)
    exposure = model.handle.exposure
    assert exposure.gradient_queries == 0 and exposure.access.label == "black-box"
    assert exposure.forward_queries == result.calls["train"] + result.calls["val"]
    assert result.calls["train"] == 3 * 2 * 2 * 2  # steps × q × two evaluations × two calls (prompts, queries)
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert zo_names & changed, "the zeroth-order tensors did not move"
    assert all(torch.equal(owner[k], v) for k, v in model.handle._backbone.module().state_dict().items())
    with pytest.raises(AccessDeniedError, match="dark-gray"):  # the same adapters asking a gradient: refused
        AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", "black-box", "dga"), "dga")


@pytest.mark.parametrize("budget", [48, 53])
def test_max_calls_is_exact(tiny_clip_dir, budget: int) -> None:
    model = zo_model(tiny_clip_dir)
    result = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
                 TrainConfig(lr=1e-2, batch_size=4, max_steps=100, eval_every=3, zo="mezo", zo_q=3,
                             max_calls=budget), progress=False)
    cost = 3 * 2 * 2  # q × two evaluations × two calls (class prompts, queries)
    assert result.calls["step"] == cost and result.stopped == "max_calls" and result.steps == budget // cost
    assert result.calls["train"] == (budget // cost) * cost <= budget
    assert model.handle.exposure.forward_queries == result.calls["train"] + result.calls["val"]
    assert result.history[-1]["step"] == result.steps  # the last step was validated
    assert [h["train_calls"] for h in result.history] == [3 * cost, result.calls["train"]]


def test_max_calls_below_one_step_is_refused_without_passing_it(tiny_clip_dir) -> None:
    model = zo_model(tiny_clip_dir)
    with pytest.raises(InvalidInputError, match="max_calls=5 does not pay for one training step.*--zo-q"):
        fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
            TrainConfig(lr=1e-2, batch_size=4, max_steps=5, zo_q=2, max_calls=5), progress=False)
    assert model.handle.exposure.forward_queries == 5  # the refused sixth call was never sent


def test_max_calls_holds_for_gradient_methods_too(tiny_clip_dir) -> None:
    model = AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga")
    result = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
                 TrainConfig(lr=1e-2, batch_size=4, max_steps=100, eval_every=3, grad_accum=2, max_calls=11),
                 progress=False)
    assert result.calls["step"] == 4 and result.calls["train"] == 8 and result.steps == 2  # 2 × (2 batches × 2)
    assert result.history[-1]["step"] == 2


def test_zeroth_order_settings_need_a_zeroth_order_model(tiny_clip_dir) -> None:
    model = AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga")
    with pytest.raises(InvalidInputError, match="zo, zo_q set zeroth-order training, but method 'dga'"):
        fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8), TrainConfig(lr=1e-2, zo="spsa", zo_q=2),
            progress=False)


@pytest.mark.parametrize("estimator", ["spsa-gc", "zip"])
def test_resume_equals_uninterrupted_zeroth_order_training(tiny_clip_dir, tmp_path, estimator: str) -> None:
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, eval_every=2, seed=3, zo=estimator, zo_q=1,
                         zo_dim=8 if estimator == "zip" else None)
    model = zo_model(tiny_clip_dir)
    whole = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config, progress=False)
    reference = state(model)
    ckpt = tmp_path / "ckpt.pt"
    model = zo_model(tiny_clip_dir)
    with pytest.raises(Interrupt):
        fit(model, StopAfter(ClassificationTask(toy_texts(), "a {}"), 7), toy_texts(8, seed=1), config,
            checkpoint=ckpt, progress=False)  # 2 loss evaluations a step: dies in step 4
    model = zo_model(tiny_clip_dir)
    resumed = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config, checkpoint=ckpt,
                  progress=False)
    assert resumed.steps == whole.steps == 4 and resumed.calls["train"] == whole.calls["train"]
    for key, value in reference.items():
        torch.testing.assert_close(state(model)[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_zeroth_order_alone_lowers_the_training_loss(tiny_clip_dir) -> None:
    """prompt-zo with the temperature frozen: only the zeroth-order prompt tokens train."""
    model = zo_model(tiny_clip_dir, "prompt-zo")
    model.logit_scale.requires_grad_(False)
    assert model.trainable_parameters() == sum(p.numel() for p in zo_parameters(model).values()) > 0
    task = ClassificationTask(toy_texts(), "a {}")
    batch = (list(task.data.texts), task.data.labels)
    with torch.no_grad():
        before = float(task.loss(model, batch))
    fit(model, task, toy_texts(8, seed=1), TrainConfig(lr=3e-2, batch_size=24, max_steps=8, warmup=0.0, zo="spsa",
                                                       zo_q=2, eval_every=8), progress=False)
    with torch.no_grad():
        after = float(task.loss(model, batch))
    assert after < before - 0.01, (before, after)


# ---- real model, real data, a served backbone, the command line --------------------------------------


def test_short_zeroth_order_run_on_minilm_lowers_the_training_loss(tmp_path) -> None:
    from graytune.data.catalog import load_splits
    from graytune.data.labeled import LabeledTexts

    splits = load_splits("wordnet-supersense", None)
    train = LabeledTexts("wn", tuple(splits.train.texts[:12]), splits.train.labels[:12], splits.train.class_names)
    handle = open_for("minilm", None, "dga-zo")
    assert handle.access.label == "black-box"
    model = AdaptedModel.build(handle, "dga-zo")
    task = ClassificationTask(train, splits.prompt)
    batch = (list(train.texts), train.labels)
    with torch.no_grad():
        before = float(task.loss(model, batch))
    result = fit(model, task, train, TrainConfig(lr=3e-3, batch_size=12, max_steps=4, warmup=0.0, eval_every=4,
                                                 zo="mezo"), checkpoint=tmp_path / "ckpt.pt", progress=False)
    with torch.no_grad():
        after = float(task.loss(model, batch))
    assert after < before, (before, after)
    assert handle.exposure.gradient_queries == 0 and result.calls["train"] == 4 * 1 * 2 * 2
    assert calls_curve(tmp_path) == [(16, result.history[-1]["val_accuracy"])]


def test_zeroth_order_run_against_a_black_box_server(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(access="black-box", reads=(), quota_samples=2_000)
    store, kept = app.state.service.store, []
    original = store.put
    monkeypatch.setattr(store, "put", lambda *a, **k: kept.append(a) or original(*a, **k))
    monkeypatch.setenv("GRAYTUNE_API_KEY", ALICE)
    handle = open_for(url, None, "dga-zo")
    assert handle.access.label == "black-box"
    model = AdaptedModel.build(handle, "dga-zo")
    before = state(model)
    result = fit(model, ClassificationTask(toy_texts(12), "a {}"), toy_texts(6, seed=1),
                 TrainConfig(lr=1e-2, batch_size=6, max_steps=5, zo="spsa", zo_q=1, max_calls=9), progress=False)
    assert result.steps == 2 and result.calls["train"] == 8 and result.stopped == "max_calls"
    assert any(not torch.equal(v, before[k]) for k, v in state(model).items() if "text_adapters.0" in k)
    stats = handle.stats()
    assert kept == [] and stats["sessions"] == 0 and stats["grad_rows_used"] == 0  # forward only, nothing kept
    assert handle.exposure.gradient_queries == 0
    assert stats["samples_used"] == result.calls["train_samples"] + result.calls["val_samples"]


def test_graytune_train_records_calls_and_refuses_misplaced_flags(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from graytune.cli.main import main
    from tests.data.test_catalog import write_pairs

    out = tmp_path / "zo"
    base = ["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(write_pairs(tmp_path / "d", 30)),
            "--batch-size", "4", "--json"]
    assert main([*base, "--method", "dga-zo", "--out", str(out), "--zo", "zip", "--zo-dim", "8", "--zo-q", "2",
                 "--max-steps", "20", "--max-calls", "30", "--eval-every", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["access"] == "black-box" and summary["stopped"] == "max_calls"
    assert summary["calls"]["train"] == 24 and summary["steps"] == 3  # 2 × 2 × 2 calls a step (images, captions)
    assert summary["zeroth_order"] == {"zo": "zip", "zo_q": 2, "zo_eps": 0.01, "zo_dim": 8, "zo_momentum": None}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["calls"] == summary["calls"] and config["exposure"]["gradient_queries"] == 0
    assert config["train"]["zo"] == "zip" and config["train"]["max_calls"] == 30 and config["access"] == "black-box"
    assert config["trainable_parameters"] == summary["trainable_parameters"] > 0
    assert [c for c, _ in calls_curve(out)] == [16, 24]
    assert main(["eval", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(tmp_path / "d" / "pairs.csv"),
                 "--adapter", str(out), "--json", "--split", "test"]) == 0  # read back at black-box, no flag needed
    assert json.loads(capsys.readouterr().out)["test"] == summary["test"]

    assert main([*base, "--method", "dga", "--zo", "spsa", "--out", str(tmp_path / "x")]) == 2
    assert "--zo set zeroth-order training; --method dga trains no adapter zeroth-order" in capsys.readouterr().err
    assert main([*base, "--method", "dga-zo", "--zo", "mezo", "--zo-momentum", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "zo_momentum (the gradient correction) is for zo=spsa-gc; zo is mezo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--method", "dga-zo", "--zo", "spsaa", "--out", str(tmp_path / "x")])
    assert "did you mean 'spsa'" in capsys.readouterr().err
    assert main([*base, "--method", "zero-shot", "--max-calls", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--method zero-shot trains nothing" in capsys.readouterr().err
