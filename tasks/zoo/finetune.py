"""Fine-tuning from a release in ``moezoo fit``: what ``--ckpt_path`` may not be.

``--ckpt_path`` resumes (or evaluates) a Lightning checkpoint: weights, optimiser state, epoch. A release's
``.safetensors`` file holds weights only; fine-tuning from it is ``model.init_args.model: <model>.<tag>`` with
``model.init_args.pretrained: true`` (the recipes in ``configs/finetune/``).
"""

from __future__ import annotations

from pathlib import Path

from moezoo.models.registry import list_models, resolve_pretrained_cfg


def release_of_file(path: str | Path) -> str | None:
    """The registered release whose weight file is named like ``path`` (``None`` when none is)."""
    file = Path(path).name
    for name in list_models(pretrained=True):
        if resolve_pretrained_cfg(name).file == file:
            return name
    return None


def check_ckpt_path(ckpt_path: object, subcommand: str) -> None:
    """``ValueError`` naming the right option when ``--ckpt_path`` is a safetensors weight file (a release)."""
    if not isinstance(ckpt_path, (str, Path)) or not str(ckpt_path).endswith(".safetensors"):
        return
    name = release_of_file(ckpt_path) or "<model>.<tag>"
    raise ValueError(
        f"--ckpt_path {ckpt_path}: `moezoo {subcommand}` --ckpt_path takes a Lightning checkpoint (.ckpt: weights, "
        "optimiser state and epoch), and this is a safetensors weight file (a release). To start from released "
        f"weights, set `--model.init_args.model {name} --model.init_args.pretrained true` (in a config: model: "
        f"{{init_args: {{model: {name}, pretrained: true}}}}; recipes in configs/finetune/), without --ckpt_path"
    )
