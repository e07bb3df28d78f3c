"""Router-study helpers. ``CPUTimeBudget`` (a training budget in process CPU time) lives in
:mod:`moezoo.tasks.callbacks`; it is importable from here because the router-study configs name this path."""

from moezoo.tasks.callbacks import CPUTimeBudget

__all__ = ["CPUTimeBudget"]
