"""The demo data set: procedurally drawn scenes whose captions state what is drawn.

Each scene shows ``count`` copies of one shape in one colour and size, placed at one position, on a
plain light background. Captions state every attribute in varied wording; ``parse_caption`` inverts
every wording exactly, so evaluation knows what a prompt asks for. Some colour+shape pairs never
appear in training (``HELD_OUT_PAIRS``): held-out prompts use them, so prompt fidelity measures
generalisation to unseen combinations rather than memorisation.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
COUNTS = (1, 2)
HELD_OUT_PAIRS = (("green", "triangle"), ("blue", "circle"), ("yellow", "square"))

BACKGROUND = (236, 236, 232)
RGB = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (235, 195, 25)}
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
_HALF = {"small": 0.085, "large": 0.145}  # half-extent as a fraction of the image side
_JITTER = 0.025

# Wording: several phrasings per value; parse_caption accepts all of them.
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of")}
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the centre"),
}
_TEMPLATES = (
    "{count} {size} {colour} {shape} {position}",
    "{position}, {count} {size} {colour} {shape}",
    "there is {count} {size} {colour} {shape} {position}",
    "a picture of {count} {size} {colour} {shape} {position}",
)


@dataclass(frozen=True)
class SceneAttributes:
    shape: str
    colour: str
    position: str
    size: str
    count: int


def sample_attributes(rng: np.random.Generator, held_out: bool = False) -> SceneAttributes:
    """Random attributes from the training split (or, with ``held_out``, from the held-out pairs)."""
    while True:
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if ((colour, shape) in HELD_OUT_PAIRS) == held_out:
            break
    return SceneAttributes(
        shape=shape,
        colour=colour,
        position=POSITIONS[rng.integers(len(POSITIONS))],
        size=SIZES[rng.integers(len(SIZES))],
        count=COUNTS[rng.integers(len(COUNTS))],
    )


def _object_centres(attrs: SceneAttributes, rng: np.random.Generator) -> list[tuple[float, float]]:
    cx, cy = _CENTRES[attrs.position]
    if attrs.count == 1:
        offsets = [(0.0, 0.0)]
    else:
        # two objects side by side along the axis that keeps them inside the region
        d = _HALF[attrs.size] + 0.03
        offsets = [(0.0, -d), (0.0, d)] if attrs.position in ("left", "right") else [(-d, 0.0), (d, 0.0)]
    jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
    return [(cx + ox + jx, cy + oy + jy) for ox, oy in offsets]


def render_scene(attrs: SceneAttributes, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene at ``image_size`` px; placement jitters a little with ``rng``."""
    scale = 4  # draw large and downsample: anti-aliased edges like real photos, not jagged pixels
    side = image_size * scale
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = _HALF[attrs.size] * side
    for cx, cy in _object_centres(attrs, rng):
        x, y = cx * side, cy * side
        box = (x - half, y - half, x + half, y + half)
        if attrs.shape == "circle":
            draw.ellipse(box, fill=RGB[attrs.colour])
        elif attrs.shape == "square":
            draw.rectangle(box, fill=RGB[attrs.colour])
        else:
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=RGB[attrs.colour])
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Wording:
    """Which phrasing a caption uses: template and word indices (taken modulo each value's options)."""

    template: int = 0
    count: int = 0
    size: int = 0
    position: int = 0


def caption_with(attrs: SceneAttributes, wording: Wording) -> str:
    """The caption of ``attrs`` in ``wording``: captions that differ in one attribute keep the rest verbatim."""

    def pick(options: tuple[str, ...], i: int) -> str:
        return options[i % len(options)]

    shape = attrs.shape + ("s" if attrs.count > 1 else "")
    text = pick(_TEMPLATES, wording.template).format(
        count=pick(_COUNT_WORDS[attrs.count], wording.count),
        size=pick(_SIZE_WORDS[attrs.size], wording.size),
        colour=attrs.colour,
        shape=shape,
        position=pick(_POSITION_WORDS[attrs.position], wording.position),
    )
    return text.replace("there is two", "there are two")


def random_wording(attrs: SceneAttributes, rng: np.random.Generator) -> Wording:
    # The draw order (template, count, size, position) is the data set's: changing it changes every caption.
    return Wording(
        template=int(rng.integers(len(_TEMPLATES))),
        count=int(rng.integers(len(_COUNT_WORDS[attrs.count]))),
        size=int(rng.integers(len(_SIZE_WORDS[attrs.size]))),
        position=int(rng.integers(len(_POSITION_WORDS[attrs.position]))),
    )


def caption_for(attrs: SceneAttributes, rng: np.random.Generator) -> str:
    """A caption of ``attrs`` in a random wording."""
    return caption_with(attrs, random_wording(attrs, rng))


def _lookup(text: str, table: dict, what: str):
    # longest phrases first, so "a single" wins over "a" and "on the left side" over "on the left"
    for phrase, value in sorted(((p, v) for v, ps in table.items() for p in ps), key=lambda t: -len(t[0])):
        if re.search(rf"(^|[\s,]){re.escape(phrase)}($|[\s,])", text):
            return value
    raise ValueError(f"caption {text!r} states no {what}")


def parse_caption(caption: str) -> SceneAttributes:
    """Exact inverse of ``caption_for`` for every wording it produces."""
    text = caption.lower().strip()
    words = set(re.findall(r"[a-z]+", text))
    shape = next((s for s in SHAPES if s in words or s + "s" in words), None)
    colour = next((c for c in COLOURS if c in words), None)
    if shape is None or colour is None:
        raise ValueError(f"caption {caption!r} states no shape or colour")
    count = 2 if (shape + "s") in words else 1
    return SceneAttributes(
        shape=shape,
        colour=colour,
        position=_lookup(text, _POSITION_WORDS, "position"),
        size=_lookup(text, _SIZE_WORDS, "size"),
        count=count,
    )


def split_prompts(seed: int, n: int, held_out: bool) -> list[tuple[str, SceneAttributes]]:
    """``n`` prompts from one split: held-out colour+shape pairs (never in training) or held-in ones."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = sample_attributes(rng, held_out=held_out)
        out.append((caption_for(attrs, rng), attrs))
    return out


def held_out_prompts(seed: int, n: int) -> list[tuple[str, SceneAttributes]]:
    """``n`` prompts whose colour+shape pair never occurs in the training split."""
    return split_prompts(seed, n, held_out=True)


def held_in_prompts(seed: int, n: int) -> list[tuple[str, SceneAttributes]]:
    """``n`` prompts whose colour+shape pair occurs in training (the combination, not necessarily the caption)."""
    return split_prompts(seed, n, held_out=False)


def demo_prompts(seed: int, n: int) -> list[tuple[str, SceneAttributes]]:
    """``n`` evaluation prompts alternating held-in and held-out (so any prefix covers both splits)."""
    held_in, held_out = held_in_prompts(seed, (n + 1) // 2), held_out_prompts(seed, n // 2)
    return [p for pair in zip(held_in, held_out) for p in pair] + held_in[len(held_out) :]


# Deliberately broken entries for failure accounting: (relative url, what the server returns).
BROKEN_KINDS = ("missing_404", "html_as_jpg", "truncated_jpeg", "empty_file", "refused_port")
REFUSED_PREFIX = "refused:"


def _write_broken(images: Path, rng: np.random.Generator) -> list[dict]:
    import io

    rows = []
    buf = io.BytesIO()
    render_scene(sample_attributes(rng), 64, rng).save(buf, format="JPEG", quality=90)
    (images / "broken_html.jpg").write_text("<html><body>not an image</body></html>")
    (images / "broken_truncated.jpg").write_bytes(buf.getvalue()[:120])
    (images / "broken_empty.jpg").write_bytes(b"")
    for kind, url in zip(
        BROKEN_KINDS,
        ("images/does_not_exist.jpg", "images/broken_html.jpg", "images/broken_truncated.jpg",
         "images/broken_empty.jpg", f"{REFUSED_PREFIX}images/anything.jpg"),
    ):
        rows.append({"url": url, "caption": f"broken entry: {kind}", "broken": kind})
    return rows


def make_demo_dataset(out_dir: str | Path, n_images: int, image_size: int, seed: int, broken: bool = False) -> dict:
    """Write ``out_dir/images/*.png`` and ``out_dir/urls.parquet`` (url relative to out_dir, caption, attributes).

    Deterministic from ``seed``. The URLs are relative: the download step serves ``out_dir`` over HTTP
    on 127.0.0.1 and prefixes its address (``refused:`` entries get a port nobody listens on).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n_images), desc="demo scenes", leave=False):
        attrs = sample_attributes(rng)
        name = f"{i:06d}.png"
        render_scene(attrs, image_size, rng).save(images / name)
        rows.append({"url": f"images/{name}", "caption": caption_for(attrs, rng), "broken": "", **asdict(attrs)})
    if broken:
        rows += _write_broken(images, rng)
    frame = pd.DataFrame(rows)
    frame.to_parquet(out_dir / "urls.parquet", index=False)
    return {"url_list": str(out_dir / "urls.parquet"), "images": n_images, "broken": len(rows) - n_images}
