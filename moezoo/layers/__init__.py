"""Layers of the shared sparse-MoE core."""

from moezoo.layers.experts import FeedForward, GroupedExperts
from moezoo.layers.moe import MoE, MoEAux, summarize_aux, total_aux_loss, update_router_states
from moezoo.layers.routers import (
    ROUTERS,
    ExpertChoiceRouter,
    ReLURouter,
    Router,
    RoutingResult,
    SigmoidLossFreeRouter,
    SinkhornRouter,
    SoftMoERouter,
    SoftRoutingResult,
    TopKRouter,
    get_router,
    register_router,
)

__all__ = [
    "ROUTERS",
    "ExpertChoiceRouter",
    "FeedForward",
    "GroupedExperts",
    "MoE",
    "MoEAux",
    "ReLURouter",
    "Router",
    "RoutingResult",
    "SigmoidLossFreeRouter",
    "SinkhornRouter",
    "SoftMoERouter",
    "SoftRoutingResult",
    "TopKRouter",
    "get_router",
    "register_router",
    "summarize_aux",
    "total_aux_loss",
    "update_router_states",
]
