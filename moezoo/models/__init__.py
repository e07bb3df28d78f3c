"""Model families (one file each, registered on import) and the registry.

Each family module is imported by name below; a new family is added to that list (``tests/core`` checks that every
``@register_model`` in this folder is registered).
"""

# Imported for their side effect: the families run their @register_model functions, ``pretrained`` registers the
# released checkpoints (moezoo/weights/*.json).
from moezoo.models import conformer, dit, forecast_baselines, patchtst, patchtst_baseline, pretrained, tsfm, vit, yolo  # noqa: F401
from moezoo.models.blocks import (
    MoESpec,
    TransformerBlock,
    build_ffn,
    moe_layers,
    parameter_counts,
    run_ffn,
    share_router_modules,
)
from moezoo.models.hub_layout import save_pretrained
from moezoo.models.pretrained_cfg import PretrainedCfg
from moezoo.models.registry import (
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
    "parameter_counts",
    "register_model",
    "register_pretrained",
    "run_ffn",
    "save_pretrained",
    "share_router_modules",
]
