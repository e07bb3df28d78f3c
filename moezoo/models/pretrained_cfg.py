"""What a released checkpoint is: :class:`PretrainedCfg`.

A leaf module (it imports nothing of moezoo), so the registry, the hub and the zoo all import it and none of them
imports another for it (timm keeps its ``PretrainedCfg`` in ``_pretrained.py`` for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Absolute tolerance of a metric that a release registers none for (``moezoo zoo eval``, the model cards).
DEFAULT_TOLERANCE = 1e-4
# How a release's file may store floating tensors (``storage_dtype``); they load into the model's own dtype.
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PretrainedCfg:
    """Where a released checkpoint lives and what it was trained and evaluated with."""

    file: str
    sha256: str
    urls: list[str] = field(default_factory=list)
    num_bytes: int | None = None
    license: str = ""
    dataset: str = ""
    config: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # What the zoo needs to rerun the evaluation and write the model card (moezoo.tasks.zoo); all optional.
    domain: str = ""
    description: str = ""
    task: dict[str, Any] = field(default_factory=dict)  # {"class_path": ..., "init_args": {...}} of the task
    data: dict[str, Any] = field(default_factory=dict)  # {"class_path": ..., "init_args": {...}} of the data
    tolerance: dict[str, float] = field(default_factory=dict)  # absolute tolerance per metric for `zoo eval`
    params: dict[str, int] = field(default_factory=dict)  # {"total": ..., "active": ...} per token
    routing: dict[str, Any] = field(default_factory=dict)  # routing statistics of the evaluation run
    dense_twin: str = ""  # "name.tag" of the dense twin's release, on an MoE release
    checkpoint: str = ""  # the training checkpoint the weights were taken from (file name)
    storage_dtype: str = "float32"  # how the file stores floating tensors; they load into the model's dtype
    limitations: list[str] = field(default_factory=list)
    citations: list[str] = field(default_factory=list)
    # The input contract (moezoo.data.transforms: image size/channels/mean/std, audio features, series scaler and
    # look-back); empty in records written before it existed.
    input: dict[str, Any] = field(default_factory=dict)
    # Markdown lines the card shows after its routing statistics (further evaluations with their commands, the data
    # mixture of a pretrained model ...): `moezoo zoo release --notes FILE`.
    notes: list[str] = field(default_factory=list)

    def tolerance_for(self, metric: str) -> float:
        """The absolute tolerance of ``metric`` in ``moezoo zoo eval``: the registered one, else the default."""
        return float(self.tolerance.get(metric, DEFAULT_TOLERANCE))
