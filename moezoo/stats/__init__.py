"""The numbers every part of moezoo reports, each computed once: parameter counts, routing statistics,
throughput, and the routing heatmaps drawn from them.

Pure PyTorch (matplotlib only inside :mod:`moezoo.stats.heatmaps`, imported lazily): the tasks, the benchmarks,
``moezoo.models.parameter_counts`` and the zoo all use these functions rather than their own.
"""

from moezoo.stats.forecast import forecast_errors
from moezoo.stats.params import ComponentCount, ParameterCounts, count_parameters
from moezoo.stats.routing import LayerSummary, RoutingStats, TokenGroups
from moezoo.stats.throughput import RateMeter, median_rate, median_rates

__all__ = [
    "ComponentCount",
    "LayerSummary",
    "ParameterCounts",
    "RateMeter",
    "RoutingStats",
    "TokenGroups",
    "count_parameters",
    "forecast_errors",
    "median_rate",
    "median_rates",
]
