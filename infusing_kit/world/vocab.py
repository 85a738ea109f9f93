"""The built-in world's vocabulary: the six captioned attributes of generic images, their captions, and the
word-level tokenizer (`ToyTokenizer`: pad = 0, end-of-text = the largest id, so open_clip's argmax text pooling
finds the end of the caption).
"""
from __future__ import annotations

import numpy as np
import torch

# ---------------------------------------------------------------------------- vocabulary
SHAPES = ("square", "circle", "diamond", "triangle", "cross", "ring", "bar", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 70, 230), "yellow": (235, 215, 40),
    "purple": (140, 50, 190), "orange": (245, 135, 20), "cyan": (40, 205, 215), "pink": (250, 150, 200),
}
SIZES = {"small": 4.5, "large": 7.5}  # radius in pixels at 32 px
POSITIONS = {  # centre (x, y) as a fraction of the image side
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = {"dark": (25, 25, 30), "gray": (115, 115, 120), "light": (215, 215, 205)}
ATTRIBUTES = ("shape", "colour", "size", "position", "texture", "background")
N_VALUES = (len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS), len(TEXTURES), len(BACKGROUNDS))
N_COMBOS = int(np.prod(N_VALUES))  # 8*8*2*5*3*3 = 5760
TEMPLATES = (
    "a {size} {colour} {texture} {shape} at the {position} on a {background} background",
    "{background} background with a {size} {colour} {texture} {shape} at the {position}",
)
N_MARK_BITS = 16
N_FINE_CLASSES = 512


def combo_to_attributes(combo: np.ndarray) -> np.ndarray:
    """(N,) combination ids -> (N, 6) attribute indices (shape, colour, size, position, texture, bg)."""
    return np.stack(np.unravel_index(np.asarray(combo), N_VALUES), axis=-1)


def attributes_to_combo(attrs: np.ndarray) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.asarray(attrs).T), N_VALUES)


def caption(attrs, template: int = 0) -> str:
    s, c, z, p, t, b = (int(a) for a in attrs)
    return TEMPLATES[template].format(
        shape=SHAPES[s], colour=list(COLOURS)[c], size=list(SIZES)[z],
        position=list(POSITIONS)[p], texture=TEXTURES[t], background=list(BACKGROUNDS)[b])


def parse_caption(text: str) -> np.ndarray:
    """Inverse of `caption` (either template): the 6 attribute indices named in the text."""
    words = " " + text + " "
    out = []
    for names in (SHAPES, list(COLOURS), list(SIZES), list(POSITIONS), TEXTURES, list(BACKGROUNDS)):
        hits = [i for i, n in enumerate(names) if f" {n} " in words]
        if len(hits) != 1:
            raise ValueError(f"caption {text!r} names {len(hits)} of {names}")
        out.append(hits[0])
    return np.array(out)


# ---------------------------------------------------------------------------- tokenizer
class ToyTokenizer:
    """Word-level tokenizer for the world's captions. Ids: pad 0, words 1..V-2, end-of-text V-1."""

    def __init__(self, context_length: int = 16):
        words = set()
        for t in TEMPLATES:
            words |= {w for w in t.split() if not w.startswith("{")}
        for names in (SHAPES, COLOURS, SIZES, POSITIONS, TEXTURES, BACKGROUNDS):
            for n in names:
                words |= set(n.split())
        self.vocab = {w: i + 1 for i, w in enumerate(sorted(words))}
        self.eot_id = len(self.vocab) + 1
        self.vocab_size = self.eot_id + 1
        self.context_length = context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            try:
                ids = [self.vocab[w] for w in t.lower().split()]
            except KeyError as e:
                raise ValueError(f"word {e.args[0]!r} is not in the toy world's vocabulary "
                                 f"({len(self.vocab)} words); captions must use the world's words") from None
            ids = ids[: n - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out
