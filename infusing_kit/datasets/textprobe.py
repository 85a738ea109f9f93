"""The paper's image-text test sets as released (Flickr30k, MSCOCO): query images in record files, precomputed text
embeddings and their ground truth, read into an `containers.TextProbe` and checked before any work (every caption
has an embedding, every embedding is finite and of one width; `check_width` against the model's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import _text, record_split


def text_probe(paths: list[str | Path], embeddings: str | Path, gt: str | Path, size: int, kind: str | None = None,
               image_feature: str = "bytes_image", id_feature: str = "id"):
    """The paper's image-text test set (Flickr30k, MSCOCO) as released: query images in record files (`bytes_image`,
    `id`), precomputed text embeddings (a NumPy file holding a pickled dict caption id -> embedding, made by the
    original text tower) and the ground truth (a dict image id -> its caption ids). Returns an
    `containers.TextProbe`: the captions of each image in order, their embeddings and the image each describes.
    The two .npy files are pickles: load only files you trust (np.load(allow_pickle=True))."""
    from .containers import TextProbe
    images = record_split(paths, size, kind, label_feature=None, key_feature=id_feature, image_feature=image_feature)
    load = lambda f, what: _as_dict(np.load(f, allow_pickle=True), f, what)
    emb, truth = load(embeddings, "caption id -> text embedding"), load(gt, "image id -> caption ids")
    caption_ids, caption_image = [], []
    for i, image in enumerate(images.keys):
        if image not in truth:
            raise ValueError(f"{gt}: image {image!r} of {paths[0]} has no ground-truth captions")
        for c in truth[image]:
            caption_ids.append(_text(c))
            caption_image.append(i)
    missing = [c for c in caption_ids if c not in emb]
    if missing:
        raise ValueError(f"{embeddings}: {len(missing)} captions of the ground truth have no embedding (first: "
                         f"{missing[:3]})")
    rows = [np.asarray(emb[c], dtype=np.float32).reshape(-1) for c in caption_ids]
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        odd = next(c for c, r in zip(caption_ids, rows) if len(r) != len(rows[0]))
        raise ValueError(f"{embeddings}: the text embeddings have several widths {sorted(widths)} (caption {odd!r} has "
                         f"{len(rows[caption_ids.index(odd)])}, caption {caption_ids[0]!r} {len(rows[0])}); give one text "
                         "tower's embeddings")
    vectors = np.stack(rows)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise ValueError(f"{embeddings}: {len(bad)} text embedding(s) hold NaN or infinity (first: caption "
                         f"{caption_ids[bad[0]]!r}, row {int(bad[0])} of the ground truth's captions); image-text recall "
                         "would rank them arbitrarily. Make the embeddings again or drop those captions")
    return TextProbe(images, vectors, np.asarray(caption_image, dtype=np.int64), caption_ids)


def check_width(probe, width: int, model: str, where: str) -> None:
    """The precomputed text embeddings must be as wide as the model's image embedding."""
    have = probe.text_embeddings.shape[1]
    if have != width:
        raise ValueError(f"{where}: the text embeddings are {have} wide but {model}'s image embeddings are {width}: "
                         "they are another model's (use the text embeddings of this model's text tower, e.g. "
                         "*_text_embeddings_siglip.npy for ViT-B-16-SigLIP)")


def _as_dict(loaded, path, what: str) -> dict:
    value = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == () else loaded
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a pickled dict ({what}), got {type(value).__name__}")
    return {_text(k): v for k, v in value.items()}
