"""The built-in offline world: procedural image-caption data that needs no download.

Two domains, both rendered on the fly as uint8 tensors (N, 3, S, S), deterministic from a seed:

- generic: a shape with six captioned attributes (shape, colour, size, position, texture,
  background). Each image comes with captions that name all six, so a contrastively pretrained
  model learns to embed images by their full attribute combination. Generic image-image
  retrieval labels are that combination (several renders per combination).
- fine-grained, in one of two kinds (`WorldConfig.kind`):
  - "near" (the default, what the chapters teach on): a large centred shape in a class-specific *shade*
    of one of the eight captioned colours (512 classes = 8 shapes x 8 colours x 8 shades; shades of one
    colour lie at least 45 RGB units apart within 100 units of it). The pretrained model knows the shape and
    the colour family, which captions name, and only partly the shade, which they do not: it retrieves the
    fine-grained classes far above chance and fine-tuning has to sharpen what it already sees, as
    off-the-shelf CLIP does on cars or products. The background is a nuisance. Two of the eight shapes
    never occur among the training classes: about half of the validation and 40% of the test classes have
    them, so what the model knew of shapes matters in-domain too (test products are new objects).
  - "far": a large square carrying small dark marks on a 4x4 grid; the class is the 16-bit mark pattern
    (512 classes, any two differ in at least 3 marks). Captions never mention marks, so the pretrained model
    knows nothing of them and fine-tuning must rewrite the tower's stem (the kit's first world; the
    comparison in results/toy-*-v2.* ran on it).
  Either way the splits are class-disjoint (open-set retrieval, as in the paper).

`WorldSplits` (via `make_world`) holds every split the kit uses; see its docstring.
The vocabulary, captions and tokenizer are `vocab`'s (imported here: `world.caption`, `world.ToyTokenizer`, ...).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from ..datasets.data import Split
from .vocab import (ATTRIBUTES, BACKGROUNDS, COLOURS, N_COMBOS, N_FINE_CLASSES, N_MARK_BITS, N_VALUES,  # noqa: F401
                    POSITIONS, SHAPES, SIZES, TEMPLATES, TEXTURES, ToyTokenizer, attributes_to_combo, caption,
                    combo_to_attributes, parse_caption)  # (the world's vocabulary, read as world.X)
from .heldout import (clustered_combinations, like_test_combinations, one_attribute_neighbours,  # noqa: F401
                      spread_combinations)
# ---------------------------------------------------------------------------- rendering
def _shape_mask(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean masks (N, S, S) for per-image shape ids, offsets from the centre and radii."""
    ax, ay = dx.abs(), dy.abs()
    d = (dx ** 2 + dy ** 2).sqrt()
    masks = torch.stack([
        torch.maximum(ax, ay) <= r * 0.85,                                   # square
        d <= r,                                                              # circle
        ax + ay <= r * 1.15,                                                 # diamond
        (dy <= r * 0.8) & (dy >= -r) & (ax <= (dy + r) * 0.55),              # triangle
        ((ax <= r * 0.3) & (ay <= r)) | ((ay <= r * 0.3) & (ax <= r)),       # cross
        (d <= r) & (d >= r * 0.55),                                          # ring
        (ax <= r) & (ay <= r * 0.45),                                        # bar
        ((ax - ay).abs() <= r * 0.3) & (torch.maximum(ax, ay) <= r * 0.9),   # star (an x)
    ], dim=1)  # (N, 8, S, S)
    return masks.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, *dx.shape[1:])).squeeze(1)


def render_generic(combo: np.ndarray, seed: int, size: int = 32) -> torch.Tensor:
    """Render one image per combination id. Returns uint8 (N, 3, size, size).

    Nuisance per render (not captioned): +-1.5 px position jitter, +-12% radius, colour noise,
    pixel noise."""
    attrs = torch.as_tensor(combo_to_attributes(combo))
    n = len(attrs)
    g = torch.Generator().manual_seed(int(seed))
    scale = size / 32.0
    pos = torch.tensor(list(POSITIONS.values()))[attrs[:, 3]] * size
    pos = pos + (torch.rand(n, 2, generator=g) - 0.5) * 3.0 * scale
    r = torch.tensor(list(SIZES.values()))[attrs[:, 2]] * scale * (1 + (torch.rand(n, generator=g) - 0.5) * 0.24)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = xx[None] - pos[:, 0, None, None]
    dy = yy[None] - pos[:, 1, None, None]
    mask = _shape_mask(attrs[:, 0], dx, dy, r[:, None, None])
    colour = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[attrs[:, 1]]
    colour = colour + torch.randn(n, 3, generator=g) * 10
    # texture modulates brightness: stripes every 2 rows, dots on a 2 px lattice
    tex = torch.ones(n, size, size)
    stripes = (yy.long() // max(1, round(2 * scale))) % 2 == 0
    dots = ((yy.long() // max(1, round(scale))) % 3 == 0) & ((xx.long() // max(1, round(scale))) % 3 == 0)
    tex[attrs[:, 4] == 1] = torch.where(stripes, 1.0, 0.45)
    tex[attrs[:, 4] == 2] = torch.where(dots, 0.3, 1.0)
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[attrs[:, 5]]
    bg = bg + torch.randn(n, 3, generator=g) * 6
    img = torch.where(mask[:, None], colour[:, :, None, None] * tex[:, None], bg[:, :, None, None])
    img = img + torch.randn(img.shape, generator=g) * 6
    return img.clamp(0, 255).round().to(torch.uint8)


@functools.lru_cache(maxsize=4)
def _fine_codes(n: int = 512, min_distance: int = 3, seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    bits = np.array([bin(i).count("1") for i in range(2 ** N_MARK_BITS)])
    for c in rng.permutation(2 ** N_MARK_BITS):
        if not chosen or bits[np.bitwise_xor(np.array(chosen), c)].min() >= min_distance:
            chosen.append(int(c))
            if len(chosen) == n:
                return np.array(chosen, dtype=np.int64)
    raise ValueError(f"only {len(chosen)} codes at Hamming distance >= {min_distance}")


def fine_codes(n: int = 512, min_distance: int = 3, seed: int = 1234) -> np.ndarray:
    """n distinct 16-bit mark patterns with pairwise Hamming distance >= min_distance (greedy, fixed seed).

    The same codes in every world: class c is drawn as pattern fine_codes()[c]."""
    return _fine_codes(n, min_distance, seed).copy()


def render_fine(labels: np.ndarray, seed: int, size: int = 32, jitter: float = 1.0, mark_px: int = 2) -> torch.Tensor:
    """Render one fine-grained image per class id. uint8 (N, 3, size, size).

    A large square (random colour) on a random background, with a dark mark (mark_px square) at each
    set bit of the class's 16-bit code on a 4x4 grid inside it. Nuisance: colour, background, +-`jitter` px
    translation, pixel noise."""
    codes = torch.as_tensor(fine_codes())[torch.as_tensor(np.asarray(labels), dtype=torch.long)]
    n = len(codes)
    g = torch.Generator().manual_seed(int(seed))
    scale = size / 32.0
    # marks 4 px apart at 10, 14, 18, 22 px (of 32) from the image's corner, plus the class-independent jitter
    centre = 16 * scale + (torch.randint(-int(jitter), int(jitter) + 1, (n, 2), generator=g) * scale)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    body = torch.maximum(dx.abs(), dy.abs()) <= 11.5 * scale
    marks = torch.zeros(n, size, size, dtype=torch.bool)
    offsets = tuple(o * scale for o in (-6, -2, 2, 6))
    for bit in range(N_MARK_BITS):
        on = ((codes >> bit) & 1).bool()
        mx, my = offsets[bit % 4], offsets[bit // 4]
        m = ((dx - mx).abs() <= mark_px / 2 * scale) & ((dy - my).abs() <= mark_px / 2 * scale)
        marks |= m & on[:, None, None]
    colour = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[torch.randint(0, len(COLOURS), (n,), generator=g)]
    colour = colour + torch.randn(n, 3, generator=g) * 10
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[torch.randint(0, len(BACKGROUNDS), (n,), generator=g)]
    img = torch.where(body[:, None], colour[:, :, None, None], bg[:, :, None, None])
    img = torch.where(marks[:, None], colour[:, :, None, None] * 0.3, img)
    img = img + torch.randn(img.shape, generator=g) * 6
    return img.clamp(0, 255).round().to(torch.uint8)


N_SHADES = 8                           # near world: shades per (shape, colour) group
SHADE_RADIUS, SHADE_MIN_DISTANCE = 100.0, 45.0


@functools.lru_cache(maxsize=2)
def _shade_table(seed: int = 1234) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fam = np.array(list(COLOURS.values()), np.float64)
    rng = np.random.default_rng(seed)
    shape, colour, rgb = [], [], []
    for g in range(N_FINE_CLASSES // N_SHADES):  # group g: shape g % 8, colour g // 8
        pts: list[np.ndarray] = []
        while len(pts) < N_SHADES:  # uniform in the ball around the colour, rejection for the minimum distance
            v = rng.normal(size=3)
            c = np.clip(fam[g // len(SHAPES)] + v / np.linalg.norm(v) * SHADE_RADIUS * rng.uniform() ** (1 / 3), 10, 245)
            if all(np.linalg.norm(c - p) >= SHADE_MIN_DISTANCE for p in pts):
                pts.append(c)
        shape += [g % len(SHAPES)] * N_SHADES
        colour += [g // len(SHAPES)] * N_SHADES
        rgb += pts
    return np.array(shape), np.array(colour), np.array(rgb, np.float32)


def shade_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The near world's 512 fine-grained classes: (shape id (512,), colour-family id (512,), RGB shade (512, 3)).

    Class c has shape c // 8 % 8 and colour c // 64: the 8 classes of one (shape, colour) group differ in shade
    only, at least SHADE_MIN_DISTANCE apart and within SHADE_RADIUS of the captioned colour. Fixed seed: the
    same classes in every world."""
    return tuple(a.copy() for a in _shade_table())


def render_shades(labels: np.ndarray, seed: int, size: int = 32, jitter: float = 1.5,
                  colour_noise: float = 4.0) -> torch.Tensor:
    """Render one near-world fine-grained image per class id. uint8 (N, 3, size, size).

    The class's shape, large (radius 7.5 px at 32 px, +-12%), centred (+-`jitter` px), plain, in the class's
    shade (+ `colour_noise` per channel), on a random background (a nuisance), with pixel noise."""
    shape, _, rgb = _shade_table()
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    g = torch.Generator().manual_seed(int(seed))
    scale = size / 32.0
    pos = torch.full((n, 2), size / 2.0) + (torch.rand(n, 2, generator=g) - 0.5) * 2 * jitter * scale
    r = SIZES["large"] * scale * (1 + (torch.rand(n, generator=g) - 0.5) * 0.24)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = xx[None] - pos[:, 0, None, None]
    dy = yy[None] - pos[:, 1, None, None]
    mask = _shape_mask(torch.as_tensor(shape[labels]), dx, dy, r[:, None, None])
    colour = torch.as_tensor(rgb[labels]) + torch.randn(n, 3, generator=g) * colour_noise
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[torch.randint(0, len(BACKGROUNDS), (n,), generator=g)]
    bg = bg + torch.randn(n, 3, generator=g) * 6
    img = torch.where(mask[:, None], colour[:, :, None, None], bg[:, :, None, None])
    img = img + torch.randn(img.shape, generator=g) * 6
    return img.clamp(0, 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class WorldConfig:
    kind: Literal["near", "far"] = "near"   # the fine-grained domain (module docstring); FAR is the kit's first world
    seed: int = 0
    image_size: int = 32
    design: int = 2                  # how the held-out splits are drawn (`make_world`): 2, validation built like the
                                     # test; 1, the first design (validation from what the rest left; runs recorded
                                     # before `design` existed are design 1)
    renders_per_combo: int = 4       # generic retrieval: images per attribute combination
    generic_train: int = 6000        # generic images the fine-tuning may use (replay, distillation, Fisher)
    generic_val_combos: int = 300    # generic validation: held out from generic train, x renders
    generic_test_combos: int = 1000  # generic test (image-image retrieval): x renders
    text_pairs: int = 2000           # generic held-out images with captions (the image-text test) ...
    text_min_distance: int = 2       # ... design 1: whose combinations pairwise differ in at least this many attributes
    text_neighbour_rate: float = 0.7  # ... design 2: drawn in clusters that take this share of each combination's
                                      # one-attribute neighbours (so captions differ from others in one word)
    fine_train_classes: int = 205    # fine-grained classes for training ...
    fine_val_classes: int = 51       # ... a class-disjoint slice of the seen shapes' classes for validation
    fine_test_classes: int = 256     # class-disjoint test classes
    fine_per_class: int = 12         # images per fine-grained class
    fine_jitter: float = 1.5         # px of object translation inside a fine-grained class (a nuisance, as in photos)
    fine_mark_px: int = 3            # far: side of a mark in px (at 32 px)
    fine_unseen_shapes: tuple = (6, 7)   # near: shapes no training class has (val and test have them)
    fine_unseen_share: float = 0.4   # near, design 2: share of val and of test classes from the unseen shapes (more in
                                     # test when the seen shapes run out)


# The kit's first world, under which results/toy-*-v2.* were made (its rows predate `kind`: see `config_from_dict`).
FAR = WorldConfig(kind="far", design=1, generic_val_combos=100, generic_test_combos=200, text_pairs=500,
                  text_min_distance=1, fine_jitter=1.0)
# The near world as its first comparison (results/superseded/toy-*-cpu-v3-partial2.*) and signatures saw it:
# validation from what training and test left, 250 image-text pairs.
NEAR_V1 = WorldConfig(design=1, generic_val_combos=100, text_pairs=250)


def config_from_dict(d: dict) -> WorldConfig:
    """The WorldConfig a run recorded (metrics.json "world"). Runs made before worlds had a kind are far-world runs;
    runs made before worlds had a design are design 1."""
    d = dict(d)
    if "kind" not in d:
        d.update(kind="far", text_min_distance=1)
    d.setdefault("design", 1)
    if "fine_unseen_shapes" in d:
        d["fine_unseen_shapes"] = tuple(d["fine_unseen_shapes"])
    known = {f.name for f in fields(WorldConfig)}
    return WorldConfig(**{k: v for k, v in d.items() if k in known})


@dataclass
class WorldSplits:
    """All splits of the built-in world.

    generic_train / generic_val / generic_test: generic images labelled by attribute combination.
    val is used for checkpoint selection and search, test only for final numbers.
    text_test: distinct combinations with 2 captions each (image-text retrieval test).
    fine_train / fine_val / fine_test: fine-grained images, class-disjoint (open-set, as in the paper).

    What is held out, exactly (as in the paper's ImageNet/Flickr setting, classes are shared, images are not):
    - every image of every split is a fresh render, so no image is shared between splits or with pretraining;
    - generic_val, generic_test and text_test use disjoint sets of combinations from each other;
    - generic_train draws its combinations at random from all 5,760, so most val/test/text combinations also
      occur in generic_train (other renders);
    - the text_test combinations pairwise differ in at least `text_min_distance` attributes (near world: 2, so no
      two test captions describe scenes that differ in one word, as Flickr30k's captions rarely do);
    - the toy VLM's pretraining (`caption_stream`) drew from all combinations, and the captions of text_test
      are strings of the same two templates that pretraining saw (as "a photo of a dog" is for CLIP).
    `seen_in_generic_train` tells which val/test items have a combination that generic_train also has, so
    retention can be measured on both parts (docs/world.md)."""
    config: WorldConfig
    generic_train: Split
    generic_val: Split
    generic_test: Split
    text_test: Split
    fine_train: Split
    fine_val: Split
    fine_test: Split


def _generic_split(combos: np.ndarray, seed: int, size: int, captions: bool) -> Split:
    imgs = render_generic(combos, seed, size)
    split = Split(imgs, combos.astype(np.int64))
    if captions:
        attrs = combo_to_attributes(combos)
        split.captions = [caption(a, t) for a in attrs for t in range(len(TEMPLATES))]
        split.caption_image = np.repeat(np.arange(len(combos)), len(TEMPLATES))
    return split


def make_world(cfg: WorldConfig = WorldConfig()) -> WorldSplits:
    """Build every split, deterministically from cfg.seed (same seed, same bytes)."""
    rng = np.random.default_rng(cfg.seed)
    s = cfg.image_size
    seeds = rng.integers(0, 2 ** 31, size=8)
    # generic: held-out combinations for val/test/text never overlap each other
    perm = rng.permutation(N_COMBOS)
    nv, nt, np_ = cfg.generic_val_combos, cfg.generic_test_combos, cfg.text_pairs
    if nv + nt + np_ > N_COMBOS:
        raise ValueError("WorldConfig asks for more held-out generic combinations than exist")
    if cfg.design == 1:
        val_u, test_u = perm[:nv], perm[nv:nv + nt]
        text_c = spread_combinations(perm[nv + nt:], np_, cfg.text_min_distance)
    elif cfg.design == 2:
        test_u = perm[:nt]
        val_u = like_test_combinations(perm[nt:], nv, test_u, int(seeds[7]), exclude=test_u)
        text_c = clustered_combinations(perm[nt:][::-1], np_, cfg.text_neighbour_rate, np.random.default_rng((int(seeds[7]), 1)),
                                        exclude=np.concatenate([test_u, val_u]))
    else:
        raise ValueError(f"WorldConfig.design must be 1 or 2, got {cfg.design!r}")
    val_c = np.repeat(val_u, cfg.renders_per_combo)
    test_c = np.repeat(test_u, cfg.renders_per_combo)
    train_c = rng.integers(0, N_COMBOS, size=cfg.generic_train)
    # fine-grained: class-disjoint train / val / test
    n_cls = cfg.fine_train_classes + cfg.fine_val_classes + cfg.fine_test_classes
    if n_cls > N_FINE_CLASSES:
        raise ValueError(f"WorldConfig asks for {n_cls} fine-grained classes; the world has {N_FINE_CLASSES}")
    cls = rng.permutation(N_FINE_CLASSES)
    fine = []
    for i, c in enumerate(_fine_class_split(cfg, cls)):
        lab = np.repeat(np.sort(c), cfg.fine_per_class).astype(np.int64)
        images = (render_fine(lab, seeds[4 + i], s, cfg.fine_jitter, cfg.fine_mark_px) if cfg.kind == "far" else
                  render_shades(lab, seeds[4 + i], s, cfg.fine_jitter))
        fine.append(Split(images, lab))
    return WorldSplits(
        cfg,
        generic_train=_generic_split(train_c, seeds[0], s, captions=True),
        generic_val=_generic_split(val_c, seeds[1], s, captions=False),
        generic_test=_generic_split(test_c, seeds[2], s, captions=False),
        text_test=_generic_split(text_c, seeds[3], s, captions=True),
        fine_train=fine[0], fine_val=fine[1], fine_test=fine[2],
    )


def _fine_class_split(cfg: WorldConfig, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) class ids from a permutation of all classes. far: consecutive slices. near: training
    classes only from the seen shapes, validation and test also from the unseen ones (design 1: half the
    validation classes and about 40% of the test classes; design 2: `_near_like_test`)."""
    a, b = cfg.fine_train_classes, cfg.fine_val_classes
    if cfg.kind == "far" or not cfg.fine_unseen_shapes:
        return perm[:a], perm[a:a + b], perm[a + b:a + b + cfg.fine_test_classes]
    if cfg.design == 2:
        return _near_like_test(cfg, perm)
    unseen = np.isin(shade_table()[0][perm], cfg.fine_unseen_shapes)
    seen_ids, unseen_ids = perm[~unseen], perm[unseen]
    val_u = b // 2
    test_u = max(round(0.4 * cfg.fine_test_classes), a + b + cfg.fine_test_classes - val_u - len(seen_ids))
    if a + (b - val_u) + (cfg.fine_test_classes - test_u) > len(seen_ids) or val_u + test_u > len(unseen_ids):
        raise ValueError(f"WorldConfig asks for more fine-grained classes than the near world's seen ({len(seen_ids)}) "
                         f"and unseen ({len(unseen_ids)}) shapes give")
    sv, st = a + b - val_u, a + b - val_u + cfg.fine_test_classes - test_u
    return (seen_ids[:a], np.concatenate([seen_ids[a:sv], unseen_ids[:val_u]]),
            np.concatenate([seen_ids[sv:st], unseen_ids[val_u:val_u + test_u]]))


def _near_like_test(cfg: WorldConfig, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Design 2 of the near world's fine-grained classes: validation drawn like the test, so a validation query
    meets what a test query meets. Each (shape, colour) group's 8 shades are split in two halves of 4 (in `perm`'s
    order). Seen shapes: training takes the first halves (then, if it needs more, second halves from the back);
    validation and then test take second halves, so in both a seen-shape class is retrieved among the other 3
    shades of its half-group, and training has the group's other 4 shades. Unseen shapes (no training class):
    validation and then test take whole groups, so such a class meets its 7 sibling shades in both. Both take
    `fine_unseen_share` of their classes from the unseen shapes (the test more when the seen shapes run out)."""
    a, b, t = cfg.fine_train_classes, cfg.fine_val_classes, cfg.fine_test_classes
    shape, colour, _ = shade_table()
    group = shape * len(COLOURS) + colour
    rank = np.empty(N_FINE_CLASSES, np.int64)
    rank[perm] = np.arange(N_FINE_CLASSES)                      # a class's place in perm
    order = sorted(np.unique(group), key=lambda g: rank[group == g].min())   # groups by their first class in perm
    halves = {g: np.array(sorted(np.flatnonzero(group == g), key=lambda c: rank[c])) for g in order}
    unseen_g = [g for g in order if shape[halves[g][0]] in cfg.fine_unseen_shapes]
    seen_g = [g for g in order if g not in unseen_g]
    first = np.concatenate([halves[g][:N_SHADES // 2] for g in seen_g])
    second = np.concatenate([halves[g][N_SHADES // 2:] for g in seen_g])
    whole = np.concatenate([halves[g] for g in unseen_g]) if unseen_g else np.zeros(0, np.int64)
    val_u = round(cfg.fine_unseen_share * b)
    test_u = max(round(cfg.fine_unseen_share * t), a + b + t - val_u - len(first) - len(second))
    val_s, test_s = b - val_u, t - test_u
    spare_second = len(second) - val_s - test_s                # second halves neither val nor test takes
    if val_u + test_u > len(whole) or a > len(first) + max(spare_second, 0) or spare_second < 0:
        raise ValueError(f"WorldConfig asks for more fine-grained classes than the near world's seen "
                         f"({len(first) + len(second)}) and unseen ({len(whole)}) shapes give")
    train = np.concatenate([first, second[len(second) - max(a - len(first), 0):]])[:a]
    return (train, np.concatenate([second[:val_s], whole[:val_u]]),
            np.concatenate([second[val_s:val_s + test_s], whole[val_u:val_u + test_u]]))


def seen_in_generic_train(world: WorldSplits, split: Split) -> np.ndarray:
    """(N,) bool: whether each item of a generic split has an attribute combination that generic_train also has
    (its images are other renders). Use it to compare retention on seen and unseen combinations."""
    return np.isin(split.labels, world.generic_train.labels)


def domains(w: WorldSplits):
    """The world's splits as an experiment's data (`containers.Domains`), with one caption per generic class as its
    prompts (LwF's zero-shot logits and EWC's Fisher use them)."""
    from ..datasets.containers import Domains
    prompts = [caption(a) for a in combo_to_attributes(np.arange(N_COMBOS))]
    return Domains(w.fine_train, w.fine_val, w.fine_test, w.generic_train, w.generic_val, w.generic_test,
                   w.text_test, prompts)
