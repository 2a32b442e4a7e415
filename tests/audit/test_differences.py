"""Black-box edits leak Jacobians (issue 32): finite differences at text.token_embeds against the dark-gray VJP;
and the dark-gray attack uses its port fully (per-token edits, several cotangents per item)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import graytune
from graytune.audit.differences import finite_difference_jacobian
from graytune.audit.jacobian import exact_jacobian
from graytune.audit.towers import JITTER, Probe, TextTower, query, tower_for

#: central differences at eps 1e-2 in float32, relative to the VJP Jacobian: MiniLM 6.8e-4 on a WordNet gloss (a
#: 14-token text: 4.2e-4), the tiny random CLIP up to 6.9e-3 on the test phrases
TOLERANCE = 1e-2


class Spy:
    """A handle that records what each forward sent at the token embeddings."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.sent = handle, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def forward(self, inputs: Any, add: Any = None, **kwargs: Any) -> Any:
        self.sent.append({k: v.detach().clone() for k, v in (add or {}).items()})
        return self.handle.forward(inputs, add=add, **kwargs)


def _tower(handle: Any) -> TextTower:
    tower = tower_for(handle.spec, "text", 32, handle.tokenize)
    assert isinstance(tower, TextTower)
    return tower


def _check_finite_differences(backbone: str, text: str, tolerance: float) -> dict:  # type: ignore[type-arg]
    attacker = graytune.open_backbone(backbone, "black-box")
    owner = graytune.open_backbone(backbone, "dark-gray")
    tower = _tower(attacker)
    found = finite_difference_jacobian(attacker, tower, [text], owner, budget=100, epsilon=1e-2)
    length = int(tower.prepare([text])[0].shape[1])
    assert found["status"] == "recovered" and found["jacobian_shape"] == [tower.out_dim, length, tower.dim]
    assert found["columns"] == length * tower.dim  # every position x every embedding dimension
    spent = found["spent"]
    assert spent["vjps"] == 0 and found["gradient_calls"] == 0 and attacker.exposure.gradient_queries == 0
    assert spent["samples"] == spent["edit_rows"] == 2 * length * tower.dim  # two rows a column
    assert spent["calls"] == -(-found["columns"] // (found["rows_per_call"] // 2))
    assert found["rows_per_call"] * length <= 16384  # a server's default --max-tokens bounds each call
    assert found["relative_error"] < tolerance, found
    return found


def test_finite_differences_recover_the_whole_jacobian_at_black_box(tiny_clip) -> None:
    _check_finite_differences(tiny_clip, "abc de fgh", TOLERANCE)


@pytest.mark.slow
def test_finite_differences_on_minilm() -> None:
    found = _check_finite_differences("minilm", "a domestic animal that barks", 2e-3)
    assert found["spent"]["calls"] <= 10


def test_the_dark_gray_attack_sends_per_token_edits_and_gets_per_token_vjps(tiny_clip) -> None:
    spy = Spy(graytune.open_backbone(tiny_clip, "dark-gray"))
    tower = _tower(spy)
    items = ["abc de", "fgh ij kl"]
    answer = query(tower, spy, items, Probe("vjp", 3), torch.Generator().manual_seed(0))
    (edit,) = [sent["text.token_embeds"] for sent in spy.sent]
    length = int(tower.prepare(items)[0].shape[1])
    assert edit.shape == (6, length, tower.dim) and length > 1  # per token, 3 copies of each text
    assert edit.abs().max() < 10 * JITTER and len({tuple(row.flatten().tolist()) for row in edit}) == 6
    assert spy.exposure.gradient_queries == 1 and answer.outputs.shape == (2, tower.out_dim)
    v = answer.along.view(2, 3, -1)
    gram = v @ v.transpose(1, 2)
    assert torch.allclose(gram, torch.diag_embed(gram.diagonal(dim1=1, dim2=2)), atol=1e-3)  # orthogonal per text
    owner = graytune.open_backbone(tiny_clip, "dark-gray")
    for i, text in enumerate(items):
        jacobian = exact_jacobian(owner, tower, tower.prepare([text]))  # [E, L_i, D]
        expected = torch.einsum("ce,eld->cld", v[i], jacobian)
        got = answer.derivative[3 * i:3 * i + 3, :expected.shape[1]].float()
        assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max()), i
        assert expected[:, 0].abs().sum() > 0 and expected[:, -1].abs().sum() > 0  # gradients at every position


def test_finite_difference_slopes_are_jacobian_vector_products(tiny_clip) -> None:
    spy = Spy(graytune.open_backbone(tiny_clip, "black-box"))
    tower = _tower(spy)
    answer = query(tower, spy, ["abc de fgh"], Probe("differences", 2, 1e-2), torch.Generator().manual_seed(0))
    assert spy.exposure.gradient_queries == 0 and spy.exposure.forward_queries == 1
    (edit,) = [sent["text.token_embeds"] for sent in spy.sent]
    assert edit.shape[0] == 3 and edit[0].abs().sum() == 0  # the text as it is, then two edited copies
    jacobian = exact_jacobian(graytune.open_backbone(tiny_clip, "dark-gray"), tower, tower.prepare(["abc de fgh"]))
    u = answer.along.float()[:, :jacobian.shape[1]]
    expected = torch.einsum("eld,kld->ke", jacobian, u)
    error = (answer.derivative - expected).norm() / expected.norm()
    assert error < 5e-2  # forward differences: O(eps)


@pytest.mark.parametrize("policy", ["refuse", "count"])
def test_a_black_box_server_refusing_or_counting_edits_is_reported(serve_tiny, text_data, policy) -> None:
    from graytune.audit import AuditConfig, run_audit
    from tests.audit.conftest import KEY

    url = serve_tiny(access="black-box", black_box_edits=policy)
    config = AuditConfig(levels=("black-box",), budget=30, rows=8, modality="text", probe_train=50, probe_test=50,
                         steps_per_call=1)
    level = run_audit(url, config, api_key=KEY, data=text_data, progress=False).data["levels"]["black-box"]
    found, differences = level["finite_differences"], level["extraction"]["differences"]
    assert level["extraction"]["outputs"]["stopped"] is None  # forwards without edits are served either way
    if policy == "refuse":
        assert found["status"] == "refused" and "black-box-edits" in found["stopped"]
        assert "black-box-edits" in differences["stopped"] and len(differences["checkpoints"]) <= 2  # the first call
        assert level["recommended_quota"]["flags"]["--black-box-edits"] == "refuse"
    else:
        assert found["status"] == "recovered" and found["spent"]["vjps"] == 0
        assert "unscored" in found["note"]  # the server lends no dark-gray handle to score against
        assert found["server_counted"]["black_box_edit_rows"] >= found["spent"]["edit_rows"] > 0
