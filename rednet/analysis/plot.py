"""Draw involution kernel maps over the image they were generated from (the paper's Figure 3).

The figure shows the eval-transformed crop the model actually saw (de-normalised), then
one heat map per group: at each position, the sum of the K*K kernel generated there,
upsampled to the crop and overlaid on it, each with its own colour bar.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .kernels import capture_kernel_sums, default_layer, resolve_layer, top_groups

__all__ = [
    "DEFAULT_TOP",
    "PANEL_INCHES",
    "TITLE_INCHES",
    "denormalize",
    "figure_size",
    "load_image",
    "plot_kernel_maps",
    "visualize_kernels",
]

# All groups are drawn up to this many; beyond it (RedNet's stage 4 has 32 groups) the
# most varying ones, since a grid of 33 small panels is unreadable.
DEFAULT_TOP = 16
MAX_COLS = 6
PANEL_INCHES = 2.5
TITLE_INCHES = 0.5


def load_image(path: str | Path | None = None) -> Image.Image:
    """An RGB image from ``path``, or scikit-image's bundled astronaut photo when None.

    The astronaut ships inside scikit-image, so the tool runs on a machine with no
    network and no images of its own.

    Raises:
        ValueError: the file is missing or not a readable image; the message names it.
    """
    if path is None:
        from skimage import data  # imported here: only the no-image default needs it

        return Image.fromarray(data.astronaut())
    path = Path(path)
    try:
        with Image.open(path) as im:
            # Phone photos store their rotation in EXIF; apply it so the map matches
            # what the user sees. convert() forces the full decode inside the try.
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {path}: it is a directory") from None
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {path}: not an image format Pillow recognises") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot read image {path}: {e}") from None


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the eval transform's normalisation: (C, H, W) tensor -> (H, W, 3) floats in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    img = (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    if img.shape[0] == 1:  # grayscale models (e.g. a digits checkpoint) drawn as RGB
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def figure_size(num_groups: int) -> tuple[float, float]:
    """Figure size in inches for the input panel plus ``num_groups`` heat maps.

    Panels are ``PANEL_INCHES`` square in rows of at most ``MAX_COLS``, plus
    ``TITLE_INCHES`` for the title; the PNG is this times the dpi, in pixels.
    """
    panels = num_groups + 1
    cols = min(panels, MAX_COLS)
    rows = math.ceil(panels / cols)
    return cols * PANEL_INCHES, rows * PANEL_INCHES + TITLE_INCHES


def plot_kernel_maps(
    image: np.ndarray,
    sums: torch.Tensor,
    out: str | Path,
    title: str,
    groups: Sequence[int] | None = None,
    cmap: str = "turbo",
    alpha: float = 0.5,
    dpi: int = 100,
) -> Path:
    """Write a PNG: ``image``, then each group's kernel-sum map over it with a colour bar.

    Args:
        image: (H, W, 3) floats in [0, 1], the crop the kernels were generated from.
        sums: (G, Ho, Wo) kernel sums of that image.
        out: PNG path; parent folders are created.
        title: figure title (the layer name, and anything the reader must know).
        groups: which groups to draw, in this order; all if None.
        cmap: matplotlib colour map of the heat maps.
        alpha: opacity of the heat maps over the (grayscale) image.
        dpi: pixels per inch; the PNG is ``figure_size(len(groups)) * dpi`` pixels.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    if sums.dim() != 3:
        raise ValueError(f"expected kernel sums of one image, (G, Ho, Wo); got shape {tuple(sums.shape)}")
    groups = list(range(sums.shape[0])) if groups is None else list(groups)
    h, w = image.shape[:2]
    # Bilinear with align_corners=False puts each map value at the centre of the image
    # region its position covers, the usual convention for coarse-to-image overlays.
    maps = F.interpolate(sums[groups].float()[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    gray = image.mean(2)  # colour would compete with the colour map

    fig = plt.figure(figsize=figure_size(len(groups)), dpi=dpi, layout="constrained")
    cols = min(len(groups) + 1, MAX_COLS)
    rows = math.ceil((len(groups) + 1) / cols)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title(f"input {w}x{h}", fontsize=9)
    for ax, g, m in zip(axes[1:], groups, maps.numpy()):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        im = ax.imshow(m, cmap=cmap, alpha=alpha)
        ax.set_title(f"group {g}", fontsize=9)
        # Per-group scales: groups differ in range by orders of magnitude, and a shared
        # scale would flatten most of them; the bar gives each map's actual values.
        # A bar of its own mappable, opaque: one drawn from `im` would inherit its alpha.
        cb = fig.colorbar(ScalarMappable(im.norm, im.cmap), ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return out


def visualize_kernels(
    model: nn.Module,
    image: Image.Image,
    data_config: dict[str, Any],
    out: str | Path,
    layer: str | None = None,
    top: int | None = DEFAULT_TOP,
    note: str = "",
    cmap: str = "turbo",
    dpi: int = 100,
) -> dict[str, Any]:
    """Run ``model`` on ``image`` and plot the kernel sums of one involution layer.

    Args:
        model: the network, on the device to run on.
        image: the input photo.
        data_config: timm data config (``input_size``, ``crop_pct``, ``interpolation``,
            ``mean``, ``std``, ...), e.g. from ``timm.data.resolve_data_config``; its eval
            transform is applied, so the maps align with what the model sees.
        out: PNG path.
        layer: involution name (see ``involution_layers``); the last block of stage 3 if None.
        top: draw the ``top`` groups of largest spatial variance; None for all.
        note: appended to the title, e.g. the model name or "random weights".
        cmap: matplotlib colour map.
        dpi: pixels per inch of the PNG.

    Returns:
        What was drawn: layer, groups, shown groups, kernel size, stride, map and image
        sizes, output path and PNG size in pixels.
    """
    from timm.data import create_transform

    layer = layer if layer is not None else default_layer(model)
    inv = resolve_layer(model, layer)
    if data_config["input_size"][0] == 1:
        image = image.convert("L")
    x = create_transform(**data_config)(image)  # (C, H, W)
    device = next(model.parameters()).device
    sums = capture_kernel_sums(model, x[None].to(device), layer)[0]  # (G, Ho, Wo)
    shown = top_groups(sums, top)
    picked = "" if len(shown) == sums.shape[0] else f", top {len(shown)} of {sums.shape[0]} groups by variance"
    title = f"{layer}: sum of each position's {inv.kernel_size}x{inv.kernel_size} kernel{picked}"
    if note:
        title += f"\n{note}"
    img = denormalize(x, data_config["mean"], data_config["std"])
    path = plot_kernel_maps(img, sums, out, title, shown, cmap=cmap, dpi=dpi)
    with Image.open(path) as png:
        png_size = list(png.size)
    return dict(
        layer=layer,
        groups=sums.shape[0],
        shown=shown,
        kernel_size=inv.kernel_size,
        stride=inv.stride,
        map_size=list(sums.shape[1:]),
        image_size=list(img.shape[:2]),
        out=str(path),
        png_size=png_size,
    )
