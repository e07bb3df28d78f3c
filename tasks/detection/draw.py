"""Drawing detections and routing weights onto images (PIL) for ``moezoo predict``."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw
from torch import Tensor

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))  # fmt: skip


def draw_detections(
    image_CHW: Tensor,
    det: dict[str, Tensor],
    class_names: Sequence[str],
    routing_SN: Tensor | None = None,
    scale: int = 4,
) -> Image.Image:
    """The image (values in [0, 1]) upscaled ``scale`` times, with boxes, class names and scores, and the routing
    weights per scale written along the bottom edge."""
    array = (image_CHW.detach().cpu().clamp(0, 1) * 255).round().byte()
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    img = Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[int(label)] if int(label) < len(class_names) else str(label)
        draw.text((x1 + 2, y1 + 1), f"{name} {score:.2f}", fill=colour)
    if routing_SN is not None:
        rows = [" ".join(f"{w:.2f}" for w in scale_w) for scale_w in routing_SN.tolist()]
        draw.text((2, img.height - 12), "route " + " | ".join(rows), fill=(255, 255, 255))
    return img
