"""Layers of the shared sparse-MoE core.

The domain routers live in their own modules (``segment``, ``promoe``, ``speech_routers``, ``routers_extra``,
``expert_routers``, ``recurrent``, ``token_graph_routers``)
and register themselves with :func:`register_router` when imported; they are imported here, explicitly, so that
every router is available by name as soon as ``moezoo`` is imported.
"""

from moezoo.layers import (
    expert_routers,
    promoe,
    recurrent,
    routers_extra,
    segment,
    speech_routers,
    token_graph_routers,
)
from moezoo.layers.cartesian import CartesianMoE  # MoE layer options (MOE_LAYERS), registered on import
from moezoo.layers.chain import ChainOfExperts
from moezoo.layers.experts import FeedForward, GroupedExperts
from moezoo.layers.moe import MOE_LAYERS, MoE, MoEAux, summarize_aux, total_aux_loss, update_router_states
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
    SparseRouter,
    TopKRouter,
    check_router_kwargs,
    get_router,
    register_router,
    router_options,
)
from moezoo.layers.stochastic import StochasticMoE

__all__ = [
    "MOE_LAYERS",
    "ROUTERS",
    "CartesianMoE",
    "ChainOfExperts",
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
    "SparseRouter",
    "StochasticMoE",
    "TopKRouter",
    "check_router_kwargs",
    "expert_routers",
    "get_router",
    "promoe",
    "recurrent",
    "register_router",
    "router_options",
    "routers_extra",
    "segment",
    "speech_routers",
    "token_graph_routers",
    "summarize_aux",
    "total_aux_loss",
    "update_router_states",
]
