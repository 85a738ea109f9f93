"""The test and validation metrics of a run (docs/method.md, "Evaluation"), on any experiment's data (`Domains`).

Test (`evaluate`): the three axes of the paper's Figure 1:
- in_domain: fine-grained test retrieval, leave-one-out on the test classes (each image a query against the
  others), or queries against a separate index (gallery) when the test split is a `QueryIndex` (InShop's
  test -> index);
- generic_image: generic test retrieval, the same way;
- image_text: image <-> caption recall; the captions embedded by the frozen text tower, or precomputed text
  embeddings (`TextProbe`: the paper's Flickr30k / MSCOCO files) so no text tower is run at all;
- merged (with `Domains.merged_index`): the official final test's merged-index protocol, each domain's queries
  against one index of every domain (`metrics.merged_retrieval_metrics`).
Validation (`validation_fn`): fine-grained and generic validation mAP@20 and their mean, nothing else.
"""
from __future__ import annotations

import numpy as np

from .datasets.containers import Domains, QueryIndex, TextProbe  # noqa: F401  (evaluation.QueryIndex etc. stay importable)
from .metrics import K, image_text_recall, merged_retrieval_metrics, retrieval_metrics
from .models import VLM, embed_images, embed_texts


def _domains(data):
    from .world import domains
    return data if isinstance(data, Domains) else domains(data)


def _embedded(vlm: VLM, split, progress: bool) -> tuple:
    """(query embeddings, query labels, index embeddings or None, index labels or None) of a test split."""
    if isinstance(split, QueryIndex):
        return (embed_images(vlm, split.query, progress=progress), split.query.labels,
                embed_images(vlm, split.index, progress=progress), split.index.labels)
    return embed_images(vlm, split, progress=progress), split.labels, None, None


def text_side(vlm: VLM, text_test, progress: bool = False) -> np.ndarray:
    """The caption embeddings of the image-text probe: precomputed (TextProbe) or by the frozen text tower."""
    if isinstance(text_test, TextProbe):
        return np.asarray(text_test.text_embeddings, dtype=np.float32)
    return embed_texts(vlm, text_test.captions, progress=progress)


def evaluate(vlm: VLM, data, progress: bool = False, keep: dict | None = None) -> dict[str, dict]:
    """Test metrics on the three axes of the paper's Figure 1 (module docstring). data: Domains (or the world's
    WorldSplits). keep: a dict that receives the target and generic tests' embeddings ("in_domain", "generic_image")
    for the extra test sets' merged index (testsets.evaluate_tests)."""
    d = _domains(data)
    fine, generic = _embedded(vlm, d.target_test, progress), _embedded(vlm, d.generic_test, progress)
    if keep is not None:
        keep.update(in_domain=fine, generic_image=generic)
    pairs = embed_images(vlm, d.text_test, progress=progress)
    pick = lambda m: {k: m[k] for k in (f"map@{K}", f"mmp@{K}", "r@1", "skipped")}
    out = {"in_domain": pick(retrieval_metrics(*fine, k=K)), "generic_image": pick(retrieval_metrics(*generic, k=K)),
           "image_text": image_text_recall(pairs, text_side(vlm, d.text_test, progress), d.text_test.caption_image)}
    if d.merged_index:
        merged = merged_retrieval_metrics({"in_domain": fine, "generic_image": generic}, k=K)
        out["merged"] = {f"{name}/{key}": m[key] for name, m in merged.items() for key in (f"map@{K}", f"mmp@{K}", "r@1")}
    return out


VALIDATION_KEYS = (f"fine_map@{K}", f"generic_map@{K}", f"mean_map@{K}", "generic_agreement")


def validation_fn(data, reference: np.ndarray | None = None):
    """validate(vlm) -> fine-grained and generic validation mAP@20 and their mean (docs/method.md, "Protocol").

    reference: the pretrained model's embeddings of the generic validation images (`embed_images`); with it,
    validate also reports "generic_agreement", the mean cosine between the current and the pretrained embedding
    of each generic validation image (1 = the teacher's features; logged only, never used for selection)."""
    d = _domains(data)

    def validate(vlm: VLM) -> dict[str, float]:
        f = retrieval_metrics(embed_images(vlm, d.target_val, progress=False), d.target_val.labels, k=K, map_at_r=False)
        generic = embed_images(vlm, d.generic_val, progress=False)
        g = retrieval_metrics(generic, d.generic_val.labels, k=K, map_at_r=False)
        out = {f"fine_map@{K}": f[f"map@{K}"], f"generic_map@{K}": g[f"map@{K}"],
               f"mean_map@{K}": (f[f"map@{K}"] + g[f"map@{K}"]) / 2}
        if reference is not None:
            out["generic_agreement"] = float((generic * reference).sum(1).mean())
        return out
    # what it validates on (a run's resume identity: `train` refuses to continue a run on other validation data)
    validate.data_identity = lambda: {"target_val": d.target_val.fingerprint(),
                                      "generic_val": d.generic_val.fingerprint()}
    return validate
