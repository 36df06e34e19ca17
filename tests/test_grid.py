"""Sample grids carry their prompts: size, one text block beside each row, readable PNG on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from galip.eval.grid import PAD, labelled_grid, save_labelled_grid


def _dark(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 128).sum())


def test_grid_has_tiles_and_text_beside_every_row(tmp_path):
    images = torch.zeros(6, 3, 64, 64)  # mid grey tiles: text is the only dark ink
    labels = ["one small red circle on the left", "a picture of a pair of large yellow triangles on the left side"]
    path = save_labelled_grid(images, labels, tmp_path / "g.png", n_per_row=3)
    with Image.open(path) as img:
        grid = np.asarray(img.convert("RGB"))
    h, w, _ = grid.shape
    assert h == 2 * (64 + PAD) + PAD
    panel = w - 3 * (64 + PAD) - PAD
    assert panel >= 120  # room for the text, left of the tiles
    tiles = grid[PAD : PAD + 64, panel + PAD : panel + PAD + 64]
    assert (tiles == 128).all()  # images are pasted unscaled: [-1, 1] -> 0..255, 0 -> 128
    for row in range(2):
        band = grid[PAD + row * (64 + PAD) : (row + 1) * (64 + PAD), :panel]
        assert _dark(band) > 50, f"no text beside row {row}"
    assert not list(tmp_path.glob(".*"))  # written atomically, no temporary left behind


def test_long_prompts_wrap_inside_the_panel_and_partial_rows_are_blank():
    images = torch.full((5, 3, 64, 64), 1.0)  # white tiles
    grid = np.asarray(labelled_grid(images, ["word " * 40, "x"], n_per_row=3))
    panel = grid.shape[1] - 3 * (64 + PAD) - PAD
    # text stays in the panel: the gap between panel and first tile column has no ink
    assert _dark(grid[:, panel : panel + PAD]) == 0
    assert (grid[PAD + 64 + PAD :, -(64 + PAD) :] == 255).all()  # the 6th slot is empty background


def test_one_label_per_row_is_required():
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid(torch.zeros(4, 3, 8, 8), ["a"], n_per_row=2)
