"""The input contract of a release, read off the data module it was trained with (``PretrainedCfg.input``).

The training data modules normalise with the constants of :mod:`moezoo.data.transforms`; this module states, for
each kind of data module, which of them a model trained on it expects, so ``moezoo.data.transform_for`` can apply
them to raw input.
"""

from __future__ import annotations

from typing import Any

from moezoo.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    DIGITS_VALUE_RANGE,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    audio_input,
    image_input,
    series_input,
)

# The generation modules map [0, 1] pixels to [-1, 1]: mean 0.5, std 0.5.
_UNIT_TO_SYMMETRIC = (0.5, 0.5)


def input_contract(datamodule: Any) -> dict[str, Any]:
    """The input record of a model trained on ``datamodule`` (set up here if it needs its data, e.g. a scaler).

    ``ValueError`` for a data module whose input contract is not known (name it in this function)."""
    from moezoo.tasks.generation.data import DigitsGenerationDataModule, FashionMNISTGenerationDataModule
    from moezoo.tasks.vision.data import (
        CIFARDataModule,
        DigitsDataModule,
        FashionMNISTDataModule,
        ImageFolderDataModule,
    )

    if isinstance(datamodule, DigitsGenerationDataModule):
        return image_input(8, 1, DIGITS_VALUE_RANGE, *_UNIT_TO_SYMMETRIC)
    if isinstance(datamodule, FashionMNISTGenerationDataModule):
        return image_input(28, 1, 255, *_UNIT_TO_SYMMETRIC)
    if isinstance(datamodule, DigitsDataModule):
        return image_input(8, 1, DIGITS_VALUE_RANGE, DIGITS_MEAN, DIGITS_STD)
    if isinstance(datamodule, FashionMNISTDataModule):
        return image_input(28, 1, 255, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if isinstance(datamodule, CIFARDataModule):
        return image_input(32, 3, 255, CIFAR_MEAN, CIFAR_STD)
    if isinstance(datamodule, ImageFolderDataModule):
        return image_input(datamodule.image_size, 1 if datamodule.grayscale else 3, 255, 0.5, 0.5)
    kind = type(datamodule).__module__
    if kind.startswith("moezoo.tasks.detection"):  # every detection module reads 8-bit images scaled to [0, 1]
        return image_input(datamodule.img_size, datamodule.in_chans, 255)
    if kind.startswith("moezoo.tasks.speech"):
        return audio_input()
    if kind.startswith("moezoo.tasks.timeseries"):
        datamodule.setup("fit")
        scaler = datamodule.scaler
        return series_input(
            datamodule.seq_len, datamodule.columns, None if scaler is None else scaler.mean.tolist(),
            None if scaler is None else scaler.std.tolist(),
        )  # fmt: skip
    raise ValueError(
        f"the input contract of {type(datamodule).__qualname__} is not known; add it to "
        "moezoo.tasks.zoo.contracts.input_contract"
    )
