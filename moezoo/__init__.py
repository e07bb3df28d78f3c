"""moezoo: sparse Mixture-of-Experts models for vision, speech, time series and detection."""

from moezoo.layers import MoE, MoEAux, get_router, register_router
from moezoo.models import create_model, list_models, register_model, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEAux",
    "create_model",
    "get_router",
    "list_models",
    "register_model",
    "register_router",
    "save_pretrained",
]
