"""Adapters, one file each (``XConfig`` + ``X``), registered by name; imports neither access nor backbones.

Example:
    >>> from graytune.adapters import ADAPTERS, build_adapter
    >>> ADAPTERS.names()
    ['adalink', 'dga-output', 'dga-pixel', 'dga-text', 'lga', 'output-mlp']
"""

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, build_adapter, config_from_dict, zo_parameters
from graytune.adapters.lora import WHITEBOX, apply_whitebox, whitebox_config
from graytune.adapters.transmiter import LOGIT_ADAPTERS

from graytune.adapters import adalink, dga_output, dga_pixel, dga_text, lga, output_mlp  # noqa: E402,F401,I001

__all__ = ["ADAPTERS", "LOGIT_ADAPTERS", "WHITEBOX", "Adapter", "TowerRequest", "apply_whitebox", "build_adapter",
           "config_from_dict", "whitebox_config", "zo_parameters"]
