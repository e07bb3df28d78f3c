"""Model families (one file each, registered on import) and the registry."""

import importlib
import pkgutil

from moezoo.models.blocks import MoESpec, TransformerBlock, build_ffn, moe_layers, parameter_counts, run_ffn
from moezoo.models.registry import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    list_models,
    register_model,
    register_pretrained,
)

# Import every module of this package so that each family's @register_model runs.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "MoESpec",
    "PretrainedCfg",
    "TransformerBlock",
    "build_ffn",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "moe_layers",
    "parameter_counts",
    "register_model",
    "register_pretrained",
    "run_ffn",
]
