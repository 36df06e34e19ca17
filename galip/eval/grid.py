"""Sample grids that carry their prompts: one row per prompt, the prompt written beside its row.

A grid in runs/, MLflow or Prefect is then readable without the config that produced it. The text
uses PIL's built-in font (no font files to ship), sized to the tile height and wrapped to the panel.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 2
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # 64 px tiles get 12 px text (4 lines per row); 224 px tiles 24 px.
    return ImageFont.load_default(size=max(10, min(24, tile // 5)))


def _char_width(font) -> float:
    sample = "a small red circle on the left"
    return max(1.0, font.getlength(sample) / len(sample))


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by measured pixel width; a word wider than the panel is cut."""
    lines: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            word = word[:-1]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines or [""]


def labelled_grid(images: torch.Tensor, labels: Sequence[str], n_per_row: int, label_width: int | None = None) -> Image.Image:
    """RGB image: ``images`` ([N, 3, H, W] in [-1, 1]) in rows of ``n_per_row``, ``labels[r]`` left of row r.

    ``len(labels)`` must equal the number of rows (ceil(N / n_per_row)).
    """
    n, _, h, w = images.shape
    rows = math.ceil(n / n_per_row)
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows of {n_per_row} images: give one label per row")
    font = _font(h)
    line_h = int(font.size * 1.2) if hasattr(font, "size") else 12
    label_width = label_width or max(120, int(_char_width(font) * 24))
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    canvas = Image.new("RGB", (label_width + n_per_row * (w + PAD) + PAD, rows * (h + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        top = PAD + r * (h + PAD)
        lines = _wrap(label, font, label_width - 2 * PAD, max(1, h // line_h))
        y = top + max(0, (h - line_h * len(lines)) // 2)
        for line in lines:
            draw.text((PAD, y), line, fill=INK, font=font)
            y += line_h
        for c in range(n_per_row):
            i = r * n_per_row + c
            if i < n:
                canvas.paste(Image.fromarray(pixels[i]), (label_width + PAD + c * (w + PAD), top))
    return canvas


def save_labelled_grid(images: torch.Tensor, labels: Sequence[str], path: str | Path, n_per_row: int) -> Path:
    """Write :func:`labelled_grid` as a PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    labelled_grid(images, labels, n_per_row).save(tmp)
    os.replace(tmp, path)
    return path
