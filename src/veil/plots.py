"""Plot leaves shared by the report, the frontier and the attack: colours, line styles, figures, image grids.

matplotlib is imported lazily, inside the functions that draw, through its object API (no pyplot,
no global backend), so that importing Veil never needs it.
"""

from __future__ import annotations

import io
import textwrap

import torch

# Okabe-Ito colours stay distinct under the common colour-vision deficiencies; markers and line
# styles carry the same distinction in grayscale.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def new_figure(width: float, height: float):  # noqa: ANN201
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def line_style(i: int) -> dict:
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def plot_image_rows(rows: list[tuple[str, torch.Tensor, list[float] | None]], title: str = "") -> bytes:
    """Rows of images (N x C x H x W in [0, 1]); a row label on the left, PSNR (dB) under each image."""
    n = max(len(images) for _, images, _ in rows)
    fig = new_figure(1.15 * n + 1.4, 1.45 * len(rows) + (0.3 if title else 0))
    if title:
        fig.suptitle(title, fontsize=9)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (row_label, images, psnrs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(images):
                continue
            img = images[c].detach().float().clamp(0, 1).cpu()
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            if psnrs is not None:
                ax.set_xlabel(f"{psnrs[c]:.1f} dB", fontsize=8, labelpad=2)
        axes[r][0].set_ylabel(textwrap.fill(row_label, 22), fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    return png_bytes(fig)
