"""FD-FMNIST: a Frechet distance in the feature space of a small Fashion-MNIST CNN that this project trains.

It is *not* FID (no Inception network: nothing here may download weights). The classifier
(:class:`FMNISTClassifier`, ~24k parameters) was trained by ``python -m moezoo.tasks.generation.train_classifier``
on the Fashion-MNIST train split and ships as ``weights/fd_fmnist_cnn.safetensors`` beside this file. It takes
28x28 images in ``[-1, 1]`` (the range the generation task works in) and gives 64-d features (global-average
pooled last conv) and 10 logits. The same network scores the class accuracy of class-conditional samples.

Legend: B images, H feature dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "fd_fmnist_cnn.safetensors"


class FMNISTClassifier(nn.Module):
    """Three 3x3 conv stages (16, 32, 64 channels, BatchNorm, ReLU; 28 -> 14 -> 7), global average pool, linear."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1 = stage(1, 16)
        self.stage2 = stage(16, 32)
        self.stage3 = stage(32, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x_BCHW: Tensor) -> Tensor:
        if x_BCHW.dim() != 4 or tuple(x_BCHW.shape[1:]) != (1, 28, 28):
            raise ValueError(f"x must have shape (B, 1, 28, 28) in [-1, 1], got {tuple(x_BCHW.shape)}")
        h = F.max_pool2d(self.stage1(x_BCHW), 2)
        h = F.max_pool2d(self.stage2(h), 2)
        return self.stage3(h).mean(dim=(2, 3))

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.head(self.features(x_BCHW))


def load_classifier(path: str | Path = WEIGHTS_PATH) -> FMNISTClassifier:
    """The shipped FD-FMNIST classifier in eval mode (raises FileNotFoundError naming the training command)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FD-FMNIST classifier weights not found at {path}; train them with "
            "`python -m moezoo.tasks.generation.train_classifier --out <path>`"
        )
    model = FMNISTClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classifier_outputs(
    classifier: FMNISTClassifier, images_BCHW: Tensor, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """``(features (B, H) float64, logits (B, 10))`` for images in ``[-1, 1]``, in batches."""
    feats, logits = [], []
    device = next(classifier.parameters()).device
    for chunk in images_BCHW.split(batch_size):
        f = classifier.features(chunk.to(device).float().clamp(-1, 1))
        feats.append(f.double().cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def gaussian_stats(features_BH: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set, in float64."""
    if features_BH.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {features_BH.shape[0]}")
    f = features_BH.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2))`` between two Gaussians.

    ``Tr((C1 C2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of
    ``C1^(1/2) C2 C1^(1/2)`` (symmetric PSD), which is stable without a general matrix square root.
    """
    w1, v1 = np.linalg.eigh(cov1)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = sqrt1 @ cov2 @ sqrt1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def fd_fmnist(classifier: FMNISTClassifier, fake_BCHW: Tensor, real_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """FD-FMNIST of generated images (in ``[-1, 1]``) against precomputed real-image statistics."""
    feats, _ = classifier_outputs(classifier, fake_BCHW)
    mu, cov = gaussian_stats(feats)
    return frechet_distance(mu, cov, *real_stats)
