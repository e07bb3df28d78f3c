"""Model families (one file each) and the registry."""

from moezoo.models import vit  # noqa: F401  (registers moe_vit_*)
from moezoo.models.blocks import MoESpec, TransformerBlock, build_ffn, moe_layers, run_ffn
from moezoo.models.registry import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    list_models,
    register_model,
    register_pretrained,
)

__all__ = [
    "MoESpec",
    "PretrainedCfg",
    "TransformerBlock",
    "build_ffn",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "moe_layers",
    "register_model",
    "register_pretrained",
    "run_ffn",
]
