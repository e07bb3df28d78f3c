"""``moe_yolo``: an anchor-free one-stage YOLO-style detector and YOLO-MoE, a mixture of detector experts.

One expert is a complete detector: a CSP (C2f) backbone with SPPF, a PAN/FPN neck, and decoupled box/class heads
at strides 8/16/32 whose box branch predicts a distribution over ``reg_max`` bins per side (distribution focal
loss). YOLO-MoE runs ``num_experts`` such detectors and blends their raw box and class outputs per scale with
per-image weights from a learned router whose input is the experts' pooled neck features; a load-balance term
keeps every expert in use. ``dense=True`` gives the single-expert baseline, and ``match_compute_of=N`` widens
that single detector until its FLOPs match N experts (the equal-compute baseline). ``neck_moe`` (a
:class:`~moezoo.models.spec.MoESpec`, e.g. ``neck_moe={"num_experts": 4}``) adds a core :class:`moezoo.layers.MoE`
(per-pixel, patch-level routing of 1x1 conv experts) on the stride-32 features of every expert; with ``dense=True``
it becomes its dense twin too.

Legend: B images, N detector experts, S scales (3), C_s channels at scale s, O = 4*reg_max + num_classes outputs
per cell, E experts of the neck MoE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.layers.losses import load_cv, routing_entropy
from moezoo.models.blocks import build_ffn, run_ffn
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, fold_flat_kwargs, register_spec_argument
from moezoo.models.yolo_boxes import decode_outputs, postprocess

STRIDES = (8, 16, 32)
#: the neck MoE's defaults: top-2 over every pixel of the stride-32 map
NECK_MOE_DEFAULTS: dict[str, Any] = dict(top_k=2, moe_every=1, moe_offset=0)


def _fold_old_neck_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Old ``neck_moe_experts``/``neck_moe_top_k`` -> ``neck_moe``; 0 experts (the old default) was no neck MoE."""
    renames = {"neck_moe_experts": "num_experts", "neck_moe_top_k": "top_k"}
    new, old = fold_flat_kwargs(kwargs, renames, "neck_moe")
    if old and not new["neck_moe"].get("num_experts"):
        new["neck_moe"] = None
    return new, old


register_spec_argument("moe_yolo", into="neck_moe", fold=_fold_old_neck_kwargs)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """CSP block: split, a chain of bottlenecks on one half, concatenate every intermediate, fuse."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = max(1, c_out // 2)
        self.cv1 = ConvBNAct(c_in, 2 * self.c, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        ys = list(self.cv1(x).split(self.c, 1))
        for block in self.blocks:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools concatenated."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        c = c_in // 2
        self.cv1 = ConvBNAct(c_in, c, 1)
        self.cv2 = ConvBNAct(4 * c, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class PixelMoE(nn.Module):
    """A core MoE (or its dense twin) applied to every pixel of a feature map, with a residual: patch routing."""

    def __init__(self, channels: int, spec: MoESpec) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.ffn = build_ffn(channels, channels, "gelu", spec, 0)

    def forward(self, x: Tensor, auxes: list[MoEAux]) -> Tensor:
        tokens = x.permute(0, 2, 3, 1)
        return x + run_ffn(self.ffn, self.norm(tokens), auxes).permute(0, 3, 1, 2)


class DetectHead(nn.Module):
    """Decoupled head: per scale a box branch (4*reg_max bin logits) and a class branch (num_classes logits)."""

    def __init__(self, channels: Sequence[int], num_classes: int, reg_max: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        c_box = max(16, channels[0] // 4, 4 * reg_max)
        c_cls = max(channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, c_box, 3), ConvBNAct(c_box, c_box, 3), nn.Conv2d(c_box, 4 * reg_max, 1))
            for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, c_cls, 3), ConvBNAct(c_cls, c_cls, 3), nn.Conv2d(c_cls, num_classes, 1))
            for c in channels
        )
        for box, cls, stride in zip(self.box, self.cls, STRIDES):
            box_out, cls_out = box[-1], cls[-1]  # type: ignore[index]
            assert isinstance(box_out, nn.Conv2d) and isinstance(cls_out, nn.Conv2d)
            nn.init.constant_(box_out.bias, 1.0)  # type: ignore[arg-type]
            # Prior: about 5 objects per 640x640 image spread over the classes (YOLOv5/v8 initialisation).
            nn.init.constant_(cls_out.bias, math.log(5 / num_classes / (640 / stride) ** 2))  # type: ignore[arg-type]

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [torch.cat([box(f), cls(f)], 1) for f, box, cls in zip(feats, self.box, self.cls)]


class YOLODetector(nn.Module):
    """One detector expert: backbone (strides 2..32) -> PAN neck (strides 8/16/32) -> decoupled head."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        width: int = 8,
        depth: int = 1,
        reg_max: int = 16,
        neck_moe: MoESpec | None = None,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (width * m for m in (1, 2, 4, 8, 16))
        self.stem = ConvBNAct(in_chans, c1, 3, 2)
        self.stage2 = nn.Sequential(ConvBNAct(c1, c2, 3, 2), C2f(c2, c2, depth))
        self.stage3 = nn.Sequential(ConvBNAct(c2, c3, 3, 2), C2f(c3, c3, 2 * depth))
        self.stage4 = nn.Sequential(ConvBNAct(c3, c4, 3, 2), C2f(c4, c4, 2 * depth))
        self.stage5 = nn.Sequential(ConvBNAct(c4, c5, 3, 2), C2f(c5, c5, depth), SPPF(c5, c5))
        self.pixel_moe = PixelMoE(c5, neck_moe) if neck_moe is not None else None
        self.top_down4 = C2f(c5 + c4, c4, depth, shortcut=False)
        self.top_down3 = C2f(c4 + c3, c3, depth, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bottom_up4 = C2f(c3 + c4, c4, depth, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bottom_up5 = C2f(c4 + c5, c5, depth, shortcut=False)
        self.channels = (c3, c4, c5)
        self.head = DetectHead(self.channels, num_classes, reg_max)

    def forward_features(self, x: Tensor, auxes: list[MoEAux]) -> list[Tensor]:
        """Neck outputs at strides 8, 16, 32."""
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        if self.pixel_moe is not None:
            p5 = self.pixel_moe(p5, auxes)
        n4 = self.top_down4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        out3 = self.top_down3(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], 1))
        out4 = self.bottom_up4(torch.cat([self.down3(out3), n4], 1))
        out5 = self.bottom_up5(torch.cat([self.down4(out4), p5], 1))
        return [out3, out4, out5]


class ExpertBlendRouter(nn.Module):
    """Per-scale router: pooled neck features of all N experts -> softmax weights over the experts, per image.

    ``top_k < N`` keeps each image's k largest weights (renormalised). The last layer starts at zero, so training
    starts from the uniform blend. The balance term ``N * sum_n mean_b(w_bn)^2`` equals 1 when the batch uses
    every expert equally and N when one expert takes every image; it does not penalise confident per-image
    choices.
    """

    blends_expert_outputs = True  # one router blending whole experts' outputs (see moezoo.zoo.router_summary)

    def __init__(
        self,
        channels: Sequence[int],
        num_experts: int,
        hidden: int = 64,
        top_k: int | None = None,
        temperature: float = 1.0,
        balance_coef: float = 0.01,
    ) -> None:
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"router_top_k must be in [1, num_experts={num_experts}] or None, got {top_k!r}")
        if temperature <= 0:
            raise ValueError(f"router_temperature must be > 0, got {temperature}")
        if balance_coef < 0:
            raise ValueError(f"balance_coef must be >= 0, got {balance_coef}")
        self.num_experts = num_experts
        self.num_scales = len(channels)
        self.top_k = top_k
        self.temperature = temperature
        self.balance_coef = balance_coef
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(num_experts * c, hidden), nn.SiLU(), nn.Linear(hidden, num_experts))
            for c in channels
        )
        for mlp in self.mlps:
            last = mlp[-1]  # type: ignore[index]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, feats_per_expert: Sequence[Sequence[Tensor]]) -> Tensor:
        """``feats_per_expert[n][s]`` of shape ``(B, C_s, H, W)`` -> weights ``(B, S, N)`` (fp32 or wider)."""
        weights = []
        for s, mlp in enumerate(self.mlps):
            pooled_BNC = torch.stack([feats[s].mean((2, 3)) for feats in feats_per_expert], 1)
            pooled_BNC = pooled_BNC.to(torch.promote_types(pooled_BNC.dtype, torch.float32))
            logits_BN = mlp(pooled_BNC.flatten(1)) / self.temperature
            w_BN = logits_BN.softmax(-1)
            if self.top_k is not None and self.top_k < self.num_experts:
                top = w_BN.topk(self.top_k, -1).indices
                keep = torch.zeros_like(w_BN).scatter(-1, top, 1.0)
                w_BN = w_BN * keep
                w_BN = w_BN / w_BN.sum(-1, keepdim=True)
            weights.append(w_BN)
        return torch.stack(weights, 1)

    def aux(self, w_BSN: Tensor) -> list[MoEAux]:
        auxes = []
        for s in range(w_BSN.shape[1]):
            w_BN = w_BSN[:, s]
            importance_N = w_BN.mean(0)
            losses = {}
            if self.balance_coef > 0:
                losses["balance"] = self.balance_coef * self.num_experts * importance_N.square().sum()
            with torch.no_grad():
                load_N = w_BN.detach().sum(0)
                auxes.append(
                    MoEAux(
                        losses=losses,
                        tokens_per_expert_E=load_N,
                        dropped_frac=load_N.new_zeros(()),
                        router_entropy=routing_entropy(w_BN.detach()),
                        expert_load_cv=load_cv(load_N),
                        num_tokens=w_BN.shape[0],
                    )
                )
        return auxes


def blend_outputs(outputs_per_expert: Sequence[Sequence[Tensor]], w_BSN: Tensor) -> list[Tensor]:
    """``out[s][b] = sum_n w[b, s, n] * outputs_per_expert[n][s][b]`` for raw maps ``(B, O, H, W)``."""
    blended = []
    for s in range(w_BSN.shape[1]):
        stacked_NBOHW = torch.stack([outs[s] for outs in outputs_per_expert], 0)
        w_NB = w_BSN[:, s].t().to(stacked_NBOHW.dtype)
        blended.append((stacked_NBOHW * w_NB[:, :, None, None, None]).sum(0))
    return blended


class MoEYOLO(nn.Module):
    """YOLO-MoE: ``num_experts`` detectors blended per scale by :class:`ExpertBlendRouter`.

    ``forward(x)`` returns a dict: ``preds`` (per-scale raw maps ``(B, 4*reg_max + C, H, W)``) and ``routing``
    (per-image weights ``(B, 3, N)``, or ``None`` for a single detector). ``predict`` decodes and runs NMS.

    ``num_experts``, ``router_*``, ``balance_coef``, ``dense`` and ``match_compute_of`` configure the mixture of
    whole detectors (not a core MoE); ``neck_moe`` (a :class:`~moezoo.models.spec.MoESpec` or a mapping of its
    fields over :data:`NECK_MOE_DEFAULTS`; ``None``: none) the core MoE on the stride-32 features, whose dense
    twin ``dense=True`` builds as well.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        width: int = 8,
        depth: int = 1,
        reg_max: int = 16,
        num_experts: int = 4,
        router_hidden: int = 64,
        router_top_k: int | None = None,
        router_temperature: float = 1.0,
        balance_coef: float = 0.01,
        neck_moe: MoESpec | Mapping[str, Any] | None = None,
        dense: bool = False,
        match_compute_of: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if not isinstance(reg_max, int) or reg_max < 2:
            raise ValueError(f"reg_max must be an integer >= 2, got {reg_max!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if match_compute_of is not None and (not dense or match_compute_of < 1):
            raise ValueError(
                f"match_compute_of={match_compute_of!r} needs dense=True and a positive number of experts to match"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.reg_max = reg_max
        self.strides = STRIDES
        neck = None if neck_moe is None else MoESpec.resolve(neck_moe, NECK_MOE_DEFAULTS)
        if neck is not None:
            neck.check_side_inputs((), "moe_yolo")
            neck = neck.replace(dense=True) if dense else neck
        self.num_experts = 1 if dense else num_experts
        self.neck_moe = neck
        expert_kwargs: dict[str, Any] = dict(
            num_classes=num_classes, in_chans=in_chans, depth=depth, reg_max=reg_max, neck_moe=neck
        )
        if match_compute_of is not None:
            width = equal_compute_width(expert_kwargs, width, match_compute_of)
        self.width = width
        self.experts = nn.ModuleList(YOLODetector(width=width, **expert_kwargs) for _ in range(self.num_experts))
        self.router = (
            ExpertBlendRouter(
                self.experts[0].channels,  # type: ignore[arg-type]
                self.num_experts,
                router_hidden,
                router_top_k,
                router_temperature,
                balance_coef,
            )
            if self.num_experts > 1
            else None
        )

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must have shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(x.shape[2:])}")

    def forward_with_aux(self, x: Tensor) -> tuple[dict[str, Any], list[MoEAux]]:
        self._check_input(x)
        auxes: list[MoEAux] = []
        experts: list[YOLODetector] = list(self.experts)  # type: ignore[arg-type]
        feats = [expert.forward_features(x, auxes) for expert in experts]
        outputs = [expert.head(f) for expert, f in zip(experts, feats)]
        if self.router is None:
            return {"preds": outputs[0], "routing": None}, auxes
        w_BSN = self.router(feats)
        auxes.extend(self.router.aux(w_BSN))
        return {"preds": blend_outputs(outputs, w_BSN), "routing": w_BSN}, auxes

    def forward(self, x: Tensor) -> dict[str, Any]:
        return self.forward_with_aux(x)[0]

    def decode(self, preds: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Raw maps -> boxes in pixels ``(B, A, 4)`` and class logits ``(B, A, C)``."""
        return decode_outputs(preds, self.strides, self.reg_max, self.num_classes)

    @torch.no_grad()
    def predict(
        self, x: Tensor, conf_thres: float = 0.25, iou_thres: float = 0.6, max_det: int = 100
    ) -> tuple[list[dict[str, Tensor]], Tensor | None]:
        """Detections per image (boxes xyxy in pixels, scores, labels) and the routing weights ``(B, 3, N)``."""
        out = self.forward(x)
        boxes, logits = self.decode(out["preds"])
        return postprocess(boxes, logits, conf_thres, iou_thres, max_det), out["routing"]


def count_flops(model: nn.Module, img_size: int = 64, in_chans: int = 1) -> int:
    """Forward FLOPs of one ``img_size`` image (``torch.utils.flop_counter``), in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, img_size, img_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def layer_flops(model: nn.Module, img_size: int = 64, in_chans: int = 1) -> int:
    """Forward FLOPs of the Conv2d and Linear layers (forward hooks; a fast estimate for searching widths)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * output.numel() * k
        else:
            total += 2 * output.numel() * int(module.in_features)  # type: ignore[arg-type]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def equal_compute_width(expert_kwargs: dict[str, Any], width: int, num_experts: int) -> int:
    """The integer base width whose single detector has FLOPs closest to ``num_experts`` detectors of ``width``.

    FLOPs are close to ``a * w^2 + b * w`` in the base width; two measurements give the guess, and the integers
    around it are measured.
    """
    in_chans = expert_kwargs["in_chans"]
    cache: dict[int, int] = {}

    def flops(w: int) -> int:
        if w not in cache:
            cache[w] = layer_flops(_FeatureAndHead(YOLODetector(width=w, **expert_kwargs)), 64, in_chans)
        return cache[w]

    target = num_experts * flops(width)
    if num_experts == 1:
        return width
    quad = (flops(2 * width) - 2 * flops(width)) / 2  # a * width^2
    lin = flops(width) - quad  # b * width
    ratio = (-lin + math.sqrt(lin * lin + 4 * quad * target)) / (2 * quad) if quad > 0 else target / flops(width)
    guess = max(1, round(ratio * width))
    return min(range(max(1, guess - 1), guess + 2), key=lambda w: abs(flops(w) - target))


class _FeatureAndHead(nn.Module):
    def __init__(self, detector: YOLODetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.detector.head(self.detector.forward_features(x, []))


def _moe_yolo(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoEYOLO:
    return MoEYOLO(**build_kwargs("moe_yolo", defaults, kwargs))


@register_model
def moe_yolo_debug(**kwargs: Any) -> MoEYOLO:
    """Base width 4, 2 experts, reg_max 8: for tests."""
    return _moe_yolo(dict(width=4, depth=1, reg_max=8, num_experts=2, router_hidden=16), kwargs)


@register_model
def moe_yolo_nano(**kwargs: Any) -> MoEYOLO:
    """Base width 8 (channels 8..128), 4 experts."""
    return _moe_yolo(dict(width=8, depth=1, reg_max=16, num_experts=4, router_hidden=64), kwargs)


@register_model
def moe_yolo_tiny(**kwargs: Any) -> MoEYOLO:
    """Base width 16 (channels 16..256, YOLOv8n-like), 4 experts."""
    return _moe_yolo(dict(width=16, depth=1, reg_max=16, num_experts=4, router_hidden=128), kwargs)
