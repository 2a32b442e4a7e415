"""The nouns users touch are importable from ``graytune``; the training and artifact ones load only on use."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_resolve_to_their_definitions() -> None:
    import graytune
    from graytune.artifacts import load_adapter, save_adapter
    from graytune.methods import get_method
    from graytune.model import AdaptedModel
    from graytune.recipes.run import run_once
    from graytune.train.config import TrainConfig
    from graytune.train.loop import fit

    assert graytune.AdaptedModel is AdaptedModel and graytune.fit is fit and graytune.TrainConfig is TrainConfig
    assert graytune.get_method is get_method and graytune.run_once is run_once
    assert graytune.save_adapter is save_adapter and graytune.load_adapter is load_adapter
    assert set(graytune.__all__) <= set(dir(graytune)) | {"__version__"}
    for name in graytune.__all__:
        assert getattr(graytune, name) is not None, name


def test_import_graytune_loads_no_training_or_program_module() -> None:
    code = ("import sys, graytune; heavy = [m for m in sys.modules if m.startswith(('graytune.train', "
            "'graytune.recipes', 'graytune.model', 'peft'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_an_unknown_name_is_an_attribute_error() -> None:
    import pytest

    import graytune

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        graytune.nothing_here  # noqa: B018
