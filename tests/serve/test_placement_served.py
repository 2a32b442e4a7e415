"""A backbone served in bf16 with recomputation: clients see its placement, send and get float32."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import InvalidInputError
from tests.access.test_placement import _text_step
from tests.serve.conftest import ALICE


def test_a_served_backbone_says_its_placement_and_refuses_a_clients(serve) -> None:  # type: ignore[no-untyped-def]
    handle = graytune.open_backbone("minilm", "dark-gray", dtype="bf16", recompute=True)
    url, _ = serve(handle=handle, access="dark-gray", reads=())
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    assert remote.placement == {"device": "cpu", "dtype": "bf16", "recompute": True}
    z_remote, g_remote = _text_step(remote)
    z_local, g_local = _text_step(handle)
    torch.testing.assert_close(z_remote, z_local, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_remote, g_local, rtol=0, atol=1e-6)
    for owner_side in ({"dtype": "bf16"}, {"recompute": True}, {"device": "cpu"}):
        with pytest.raises(InvalidInputError, match="owner's choice"):
            graytune.open_backbone(url, "dark-gray", api_key=ALICE, **owner_side)
