"""Class-conditional image generation with ``moe_dit``: rectified flow or DDPM, CFG, EMA, sample grids, FD-FMNIST.

Training drops the class label with probability ``cfg_dropout`` (the model's null label, which ProMoE routes to
its unconditional expert). Sampling uses the EMA weights. Sample grids (one row per class) are written to
``<log dir>/samples/step_<step, 6 digits>.png`` every ``sample_every_n_steps`` steps and at the end of training.
At test time ``eval_num_samples`` class-balanced samples are scored with the shipped Fashion-MNIST classifier:
``test/fd_fmnist`` (Frechet distance in its feature space against the test split) and ``test/sample_acc``
(its accuracy on the classes asked for). ``val|test/routing_purity`` is logged from the denoising forwards.

Expert choice (``router: expert_choice``) with its default ``train_rule="batch"`` routes by one rule in training and
by another in sampling. Training applies it over the batch: each expert takes its top ``ceil(2T/E)`` of all
``T = B x L`` tokens, so images share the routed pairs unevenly. Evaluation and sampling (the eval mode of the EMA
copy) run the router's default ``eval_rule="item"``: within each image every expert takes exactly ``ceil(2L/E)``
tokens, so a sample does not depend on its batchmates, but each image gets an allocation the model never saw in
training. On ``configs/vision/dit_fmnist_expert_choice.yaml`` without ``train_rule`` (L = 49 patches, E = 8; 2000
steps of 64, seed 0) the training rule gave an image 59-134 pairs per MoE layer (mean 98) in a batch of 64 (fewer
for the cleaner images: 83 on average for the 16 lowest noise levels in the first MoE layer), where the item rule
gives every image 104. The same final EMA weights score FD-FMNIST 3.55 (2000 samples) with the item rule and 2.48
with ``eval_rule: batch`` (2.39 in chunks of 20 images instead of 250). The benchmark's earlier hand-written loop
(2.15 +- 0.03) sampled with the batch rule: ``eval_rule`` did not exist yet. Choosing within each image in training
as well (``moe.router_kwargs: {train_rule: item}``, which that config now sets) scored 2.12 on the same config and
seed, with the batch-independent item rule at sampling. ``moe.router_kwargs: {eval_rule: batch}`` (and the default
``train_rule: batch``) samples as the old loop did; an image's sample then depends on the other images of its chunk,
both guidance branches included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.io import temporary_beside
from moezoo.layers import MoEAux, update_router_states
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask
from moezoo.tasks.class_names import class_names
from moezoo.tasks.generation.data import real_images
from moezoo.tasks.generation.diffusion import SAMPLERS, build_objective, check_guidance_scale, guided
from moezoo.tasks.generation.ema import EMA
from moezoo.tasks.generation.fd import (
    WEIGHTS_PATH,
    FMNISTClassifier,
    classifier_outputs,
    frechet_distance,
    gaussian_stats,
    load_classifier,
)
from moezoo.tasks.generation.metrics import routing_purity


def save_grid(images_BCHW: Tensor, path: Path, nrow: int, min_size: int = 28) -> None:
    """Images in ``[-1, 1]`` -> a PNG grid (nearest upscaling of small images to ``min_size``)."""
    from torchvision.utils import save_image

    x = (images_BCHW.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if x.shape[-1] < min_size:
        x = F.interpolate(x, scale_factor=-(-min_size // x.shape[-1]), mode="nearest")
    with temporary_beside(path) as tmp:  # atomic: a crash never leaves half a PNG
        save_image(x, str(tmp), nrow=nrow, padding=2, pad_value=0.5, format="png")
        os.replace(tmp, path)


class ImageGenerationTask(MoETask):
    """Diffusion / flow training of a class-conditional ``moe_dit``.

    Args:
        objective: ``"rectified_flow"`` (velocity) or ``"ddpm"`` (epsilon).
        sampler: ``"euler"``/``"heun"`` (flow) or ``"ddpm"``/``"ddim"`` (DDPM); ``None`` = euler / ddim.
        num_sampling_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (>= 0; 1 = none).
        cfg_dropout: probability of dropping a training label to the null label.
        ema_decay: EMA decay of the sampling weights (0 disables averaging: the EMA copy follows the model).
        num_train_timesteps, beta_schedule: DDPM's schedule.
        sample_every_n_steps: write a sample grid every N optimiser steps (0: only at the end).
        samples_per_class: columns of the sample grid.
        eval_num_samples: class-balanced samples for FD-FMNIST and sample accuracy at test (0: skip).
        classifier_path: the FD-FMNIST classifier's safetensors (default: the shipped one).
        sample_seed: seed of the sampling noise (grids and evaluation are reproducible).
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask`.
    """

    def __init__(
        self,
        model: str = "moe_dit_debug",
        model_kwargs: dict[str, Any] | None = None,
        objective: str = "rectified_flow",
        sampler: str | None = None,
        num_sampling_steps: int = 20,
        guidance_scale: float = 2.0,
        cfg_dropout: float = 0.1,
        ema_decay: float = 0.999,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        sample_every_n_steps: int = 0,
        samples_per_class: int = 8,
        eval_num_samples: int = 0,
        classifier_path: str | None = None,
        sample_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        self.objective = build_objective(objective, num_train_timesteps, beta_schedule)
        sampler = sampler or SAMPLERS[objective][0 if objective == "rectified_flow" else 1]
        if sampler not in SAMPLERS[objective]:
            raise ValueError(
                f"sampler must be one of {SAMPLERS[objective]} for objective={objective!r}, got {sampler!r}"
            )
        check_guidance_scale(guidance_scale)
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        for name, value in (("num_sampling_steps", num_sampling_steps), ("samples_per_class", samples_per_class)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if sample_every_n_steps < 0 or eval_num_samples < 0:
            raise ValueError(
                "sample_every_n_steps and eval_num_samples must be >= 0, got "
                f"{sample_every_n_steps}, {eval_num_samples}"
            )
        if eval_num_samples and (self.model.img_size, self.model.in_chans) != (28, 1):
            raise ValueError(
                f"eval_num_samples={eval_num_samples} needs 28x28 single-channel images (FD-FMNIST), got "
                f"img_size={self.model.img_size}, in_chans={self.model.in_chans}; set eval_num_samples: 0"
            )
        self.sampler = sampler
        self.num_sampling_steps = num_sampling_steps
        self.guidance_scale = guidance_scale
        self.cfg_dropout = cfg_dropout
        self.sample_every_n_steps = sample_every_n_steps
        self.samples_per_class = samples_per_class
        self.eval_num_samples = eval_num_samples
        self.classifier_path = Path(classifier_path) if classifier_path else WEIGHTS_PATH
        self.sample_seed = sample_seed
        self.ema = EMA(self.model, ema_decay)
        self._classifier: FMNISTClassifier | None = None
        self._real_stats: tuple[np.ndarray, np.ndarray] | None = None

    #: releases ship the averaged (EMA) weights: the ones samples and FD-FMNIST are computed with
    release_prefix = "ema.module."

    def load_release_weights(self, state: dict[str, Tensor]) -> None:
        super().load_release_weights(state)
        self.ema.module.load_state_dict(state, strict=True)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    # -- training ----------------------------------------------------------------------------------
    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        x0, y = batch
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"class ids must be in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]"
            )
        if stage == "train" and self.cfg_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.cfg_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x_t, t, target = self.objective.training_example(x0)
        pred, auxes = self.model.forward_with_aux(x_t, t, y)
        loss = F.mse_loss(pred.float(), target.float())
        metrics: dict[str, Tensor] = {}
        if stage != "train":
            purity = routing_purity(auxes, y, self.num_classes)
            if purity is not None:
                metrics["routing_purity"] = torch.tensor(purity)
        return loss, auxes, metrics, x0.shape[0]

    def routing_groups(self, batch: Any) -> TokenGroups:
        """Routing shares per class (evaluation batches keep every label; training drops some for CFG)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return TokenGroups(batch[1], class_names(datamodule, self.num_classes), "class")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        update_router_states(self.model)
        self.ema.update(self.model)
        step = self.trainer.global_step
        if self.sample_every_n_steps and step % self.sample_every_n_steps == 0 and self.trainer.is_global_zero:
            self.save_samples(f"step_{step:06d}")

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero:
            self.save_samples(f"step_{self.trainer.global_step:06d}_final")

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, y: Tensor, seed: int | None = None, use_ema: bool = True) -> Tensor:
        """Class-conditional samples in ``[-1, 1]`` for labels ``y`` (B,), deterministic for a seed."""
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"class ids must be in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]"
            )
        net = self.ema.module if use_ema else self.model
        was_training = net.training
        net.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.sample_seed if seed is None else seed)
        shape = (y.shape[0], net.in_chans, net.img_size, net.img_size)
        noise = torch.randn(shape, generator=generator, device=self.device)
        fn = guided(net, self.guidance_scale, net.null_class)
        out = self.objective.sample(fn, noise, y.to(self.device), self.num_sampling_steps, self.sampler, generator)
        net.train(was_training)
        return out.clamp(-1, 1)

    def save_samples(self, name: str) -> Path:
        y = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.samples_per_class)
        images = self.generate(y)
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir) if self._trainer is not None else Path(".")
        path = root / "samples" / f"{name}.png"
        save_grid(images, path, nrow=self.samples_per_class)
        return path

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate_samples(self, num_samples: int, batch_size: int = 250) -> dict[str, float]:
        """FD-FMNIST and the classifier's accuracy on ``num_samples`` class-balanced EMA samples."""
        if self._classifier is None:
            self._classifier = load_classifier(self.classifier_path).to(self.device)
        if self._real_stats is None:
            datamodule = self.trainer.datamodule
            x_real, _ = real_images(datamodule, "test")
            feats, _ = classifier_outputs(self._classifier, x_real)
            self._real_stats = gaussian_stats(feats)
        y = torch.arange(num_samples, device=self.device) % self.num_classes
        fakes = [self.generate(chunk, seed=self.sample_seed + i) for i, chunk in enumerate(y.split(batch_size))]
        feats, logits = classifier_outputs(self._classifier, torch.cat(fakes))
        acc = float((logits.argmax(-1) == y.cpu()).float().mean())
        fd = frechet_distance(*gaussian_stats(feats), *self._real_stats)
        return {"fd_fmnist": fd, "sample_acc": acc}

    # -- predict: sample grids of requested classes (data.init_args.predict_classes) --------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``samples_per_class`` EMA samples of each class id in ``batch`` (``(class ids,)``) with the task's
        sampler, step count and CFG scale; the noise seed is ``sample_seed`` + the batch index."""
        y = (batch[0] if isinstance(batch, (tuple, list)) else batch).long()
        labels = y.repeat_interleave(self.samples_per_class)
        images = self.generate(labels, seed=self.sample_seed + batch_idx)
        return {"class_id": y, "images": images.view(y.shape[0], self.samples_per_class, *images.shape[1:]).cpu()}

    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        """Per requested class: ``class_id``, ``class``, the sampler settings and ``images`` (a tensor, written
        into the grid, not into the JSONL)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = class_names(datamodule, self.num_classes)
        settings = dict(sampler=self.sampler, num_sampling_steps=self.num_sampling_steps)
        settings.update(guidance_scale=self.guidance_scale, samples=self.samples_per_class)
        return [
            {"class_id": int(c), "class": names[int(c)], **settings, "images": images}
            for c, images in zip(prediction["class_id"].tolist(), prediction["images"])
        ]

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``samples.png`` (one row of ``samples_per_class`` images per requested class, in the order asked)
        and ``samples.jsonl`` (per row of the grid: the class and the sampler settings)."""
        from moezoo.tasks.predict import write_jsonl_atomic

        if not rows:
            return []
        grid = out_dir / "samples.png"
        save_grid(torch.cat([row["images"] for row in rows]), grid, nrow=self.samples_per_class)
        meta = [{k: v for k, v in row.items() if k != "images"} | {"grid_row": i} for i, row in enumerate(rows)]
        return [grid, write_jsonl_atomic(out_dir / "samples.jsonl", meta)]

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        classes = ", ".join(row["class"] for row in rows)
        return (
            f"{len(rows)} classes x {self.samples_per_class} samples ({self.sampler}, {self.num_sampling_steps} "
            f"steps, CFG scale {self.guidance_scale}): {classes}"
        )

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.eval_num_samples:
            for name, value in self.evaluate_samples(self.eval_num_samples).items():
                self.log(f"test/{name}", value)
