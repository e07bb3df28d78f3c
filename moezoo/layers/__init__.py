"""Layers of the shared sparse-MoE core.

Every module of this package is imported here, so a domain router defined in its own file
(registered with :func:`register_router`) is available by name as soon as ``moezoo`` is imported.
"""

import importlib
import pkgutil

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

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

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
