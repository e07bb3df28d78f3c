"""Import the core and run it in this process with some packages blocked: ``python tests/core/isolated_core.py
--block lightning omegaconf ...`` (run by ``tests/core/test_import_direction.py`` and ``test_packaging.py`` in a
fresh interpreter). Prints one JSON line with what it did; exits 1 with the reason on the first failure.

A meta-path finder installed before anything else is imported hides the blocked packages (and the modules below
them), as if they were not installed.

- every module of the core (``moezoo/`` but ``moezoo/cli.py``) and ``moezoo.kernels`` is imported;
  the modules that need triton (``moezoo.kernels.*``, ``moezoo.ops.triton_backend``) must import when triton can,
  and raise ``ImportError`` when it cannot;
- every registered model is built by ``create_model`` and runs one forward pass on a small input;
- ``moezoo.MoE`` runs forward and backward, and a shipped release loads with ``pretrained=True`` (offline).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NEEDS_TRITON = ("moezoo.kernels.", "moezoo.ops.triton_backend")


class Blocker(importlib.abc.MetaPathFinder):
    """Hides the named packages (and everything below them) as if they were not installed: it takes the place of
    the meta-path finders there are and asks them only for other names, so ``import x`` raises
    ``ModuleNotFoundError`` and ``importlib.util.find_spec("x")`` returns ``None``, as for a missing package."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.finders: list[Any] = []

    def install(self) -> Blocker:
        self.finders = [f for f in sys.meta_path if f is not self]
        sys.meta_path[:] = [self]
        return self

    def blocks(self, fullname: str) -> bool:
        return any(fullname == n or fullname.startswith(n + ".") for n in self.names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if self.blocks(fullname):
            return None
        for finder in self.finders:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Package metadata (``importlib.metadata``) as the replaced finders give it."""
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self) -> None:
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


def core_modules() -> list[str]:
    """Every module of ``moezoo/`` (except ``moezoo/cli.py``, which dispatches to the tasks lazily), and
    ``moezoo.kernels`` with its modules."""
    names = []
    for folder, package in ((ROOT / "moezoo", "moezoo"), (ROOT / "kernels", "moezoo.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join([package, *parts]))
    return [n for n in names if n != "moezoo.cli"]


def example_inputs(name: str, model: Any) -> tuple[Any, ...]:
    """A small batch for each model family (a new family must add its own)."""
    import torch

    family = name.rsplit("_", 1)[0]
    if family == "moe_vit":
        return (torch.randn(2, model.in_chans, model.img_size, model.img_size),)
    if family == "moe_dit":
        x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
        return x, torch.rand(2), torch.randint(0, model.num_classes, (2,))
    if family == "moe_conformer":
        return torch.randn(2, 48, model.n_mels), torch.tensor([48, 31])
    if family in ("moe_patchtst", "patchtst", "nlinear", "dlinear", "last_value", "seasonal_naive", "moe_tsfm"):
        return (torch.randn(2, model.seq_len, model.num_channels),)
    if family == "moe_yolo":
        return (torch.randn(2, model.in_chans, 64, 64),)
    raise KeyError(f"no example input for the model family {family!r} ({name}): add one to example_inputs")


def tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return [t for v in vars(value).values() for t in tensors(v)] if hasattr(value, "__dict__") else []


def run_models() -> list[str]:
    import torch

    import moezoo

    ran = []
    torch.set_num_threads(1)
    for name in moezoo.list_models():
        torch.manual_seed(0)
        model = moezoo.create_model(name)  # training mode: eval-mode detectors would also run their NMS
        with torch.no_grad():
            out = tensors(model(*example_inputs(name, model)))
        if not out or not all(bool(torch.isfinite(t.float()).all()) for t in out):
            raise AssertionError(f"{name}: the forward pass returned no tensor or a non-finite one")
        ran.append(name)
    return ran


def run_layer_and_release() -> None:
    import torch

    import moezoo

    moe = moezoo.MoE(dim=16, ffn_dim=32, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, aux = moe(x)
    (y.square().mean() + aux.aux_loss).backward()
    assert y.shape == x.shape and x.grad is not None and bool(torch.isfinite(x.grad).all())
    release = moezoo.list_models(pretrained=True)[0]
    model = moezoo.create_model(release, pretrained=True)  # the shipped weights, offline
    assert sum(p.numel() for p in model.parameters()) > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", nargs="*", default=[], help="packages to block (and everything below them)")
    parser.add_argument("--no-models", action="store_true", help="only import the modules")
    args = parser.parse_args()
    blocker = Blocker(args.block)
    present = [m for m in sys.modules if blocker.blocks(m)]
    if present:
        print(f"already imported before the blocker: {present}")
        return 1
    blocker.install()
    os.environ["MOEZOO_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))
    triton = importlib.util.find_spec("triton") is not None
    imported, refused = [], []
    for name in core_modules():
        needs_triton = name.startswith(NEEDS_TRITON)
        try:
            importlib.import_module(name)
        except ImportError:
            if needs_triton and not triton:
                refused.append(name)
                continue
            print(f"importing {name} failed:\n{traceback.format_exc()}")
            return 1
        if needs_triton and not triton:
            print(f"{name} imported although triton is unavailable")
            return 1
        imported.append(name)
    try:
        models = [] if args.no_models else run_models()
        if not args.no_models:
            run_layer_and_release()
    except Exception:  # noqa: BLE001 - reported to the test
        print(f"running the core failed:\n{traceback.format_exc()}")
        return 1
    leaked = sorted(m for m in sys.modules if blocker.blocks(m))
    if leaked:
        print(f"blocked modules were imported anyway: {leaked}")
        return 1
    print(json.dumps({"imported": imported, "refused_without_triton": refused, "models": models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
