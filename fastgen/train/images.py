"""PNG pictures of a run's samples with Pillow: image grids and 2D scatter plots."""

from __future__ import annotations

import io
import os

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from fastgen.train.checkpoint import atomic_write_bytes

__all__ = ["image_grid", "save_image_grid", "save_scatter"]


def image_grid(images: Tensor, *, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0),
               padding: int = 2) -> Tensor:
    """Tile ``(N, C, H, W)`` images (C = 1 or 3) into one uint8 ``(H', W', C)`` array, ``nrow`` per row.

    Values are mapped from ``value_range`` to 0..255 (clipped); the padding between tiles is black.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 1 or 3, H, W), got {tuple(images.shape)}")
    lo, hi = value_range
    pixels = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    n, c, h, w = pixels.shape
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid.permute(1, 2, 0).contiguous()


def _save_png(image: Image.Image, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_image_grid(images: Tensor, path: str | os.PathLike, *, nrow: int = 8,
                    value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> None:
    """Write :func:`image_grid` of ``images`` as a PNG, each pixel enlarged ``scale`` times."""
    grid = image_grid(images, nrow=nrow, value_range=value_range).numpy()
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    _save_png(picture, path)


def save_scatter(points: Tensor, path: str | os.PathLike, *, means: Tensor | None = None,
                 radius: float | None = None, extent: float | None = None, size: int = 512) -> None:
    """Scatter plot of ``(N, 2)`` points (black) over red rings of ``radius`` (data units; default 2%
    of the extent) around optional mode ``means``, as a PNG.

    The square ``[-extent, extent]^2`` fills the picture; by default it fits the means and points.
    """
    points = points.detach().float().cpu()
    if extent is None:
        reference = points if means is None else means.float()
        extent = 1.25 * float(reference.abs().max().clamp_min(1e-6))
    picture = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(picture)

    def to_pixels(xy: Tensor) -> Tensor:
        # y grows upwards in the plot and downwards in the picture.
        return torch.stack([(xy[:, 0] / extent + 1) * size / 2, (1 - xy[:, 1] / extent) * size / 2], dim=1)

    if means is not None:
        ring = max(2.0, (0.02 * extent if radius is None else radius) / extent * size / 2)
        for x, y in to_pixels(means.float().cpu()).tolist():
            draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline="red")
    for x, y in to_pixels(points[torch.isfinite(points).all(dim=1)]).tolist():
        draw.point((x, y), fill="black")
    _save_png(picture, path)
