"""Retrieval metrics, exactly as in the paper's evaluation (docs/method.md, section 5 "Metrics").

Two layers, as in pytorch-metric-learning:
1. `knn_search`: the only search call. Exact inner-product kNN over L2-normalised float32
   embeddings, faiss `IndexFlatIP` on CPU or torch matmul + topk (faster on a GPU). When the query
   set is the index set, each query is removed from its own neighbours *by identity* (not by
   assuming it comes first: with duplicate images it may not).
2. Pure functions of a (Q, k) relevance matrix r and the number of positives n_pos per query:
     R@1 (= P@1)  = r_1
     mAP@k        = 1/min(n_pos, k) * sum_{j<=k} r_j * (sum_{i<=j} r_i) / j
     mMP@k        = (# relevant among the first min(n_pos, k)) / min(n_pos, k)
     MAP@R        = mAP@k with k = R = n_pos (Musgrave et al. 2020)
   Queries with n_pos = 0 are skipped; `retrieval_metrics` returns how many ("skipped") and warns.

Ties (equal similarities, e.g. duplicate images or a collapsed model) are ordered the same documented way
everywhere: the lower index ranks first, as a stable sort of the similarities would order them. The query's
own item gets no preference, so a model that maps every image to one point scores chance level.

Image-text: `image_text_recall` (several captions per image) and `zero_shot_accuracy`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

Backend = Literal["auto", "faiss", "torch"]
K = 20  # the k of every mAP@k, mMP@k the kit reports and selects on (the paper's mAP@20)
FINE, GENERIC, MEAN = f"fine_map@{K}", f"generic_map@{K}", f"mean_map@{K}"  # validation keys (experiment.validation_fn)


def _as_float32(x) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _as_labels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def knn_search(query, index=None, k: int = 20, backend: Backend = "auto",
               chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours. Returns (similarities (Q, k), indices (Q, k)) as numpy.

    index=None: the query set is its own index and each query's own id is removed from its list.
    backend "auto" uses torch when the query is a CUDA tensor, else faiss.
    k is capped at the number of candidates (index size, minus one for self-search)."""
    self_search = index is None
    q = _as_float32(query)
    x = q if self_search else _as_float32(index)
    n_index = x.shape[0]
    k = min(k, n_index - (1 if self_search else 0))
    if k < 1:
        raise ValueError(f"knn_search needs at least one candidate, index has {n_index} items")
    if backend == "auto":
        backend = "torch" if isinstance(q, torch.Tensor) and q.is_cuda else "faiss"
    kk = k + 1 if self_search else k  # one extra so that the self-match can be dropped
    probe = min(kk + 1, n_index)      # one more still, to see ties that cross the cut
    if backend == "faiss":
        sims, idx = _faiss_search(_np(q), _np(x), probe)
    elif backend == "torch":
        sims, idx = _torch_search(_t(q), _t(x).to(_t(q).device), probe, chunk_size)
    else:
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    sims, idx = _order_ties(sims, idx, kk, _np(q), _np(x))
    if self_search:
        sims, idx = _drop_self(sims, idx)
    return sims, idx


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)


def _faiss_search(q: np.ndarray, x: np.ndarray, k: int):
    import faiss
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index.search(np.ascontiguousarray(q, dtype=np.float32), k)


def _torch_search(q: torch.Tensor, x: torch.Tensor, k: int, chunk_size: int):
    sims, idx = [], []
    for i in range(0, q.shape[0], max(1, chunk_size)):  # max(1, .): never a zero step (DINO knn bug)
        s, j = (q[i:i + chunk_size] @ x.T).topk(k, dim=1)
        sims.append(s.cpu())
        idx.append(j.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def _order_ties(sims: np.ndarray, idx: np.ndarray, kk: int, q: np.ndarray, x: np.ndarray):
    """Top kk in the documented order (similarity descending, then index ascending). A row whose kk-th and
    (kk+1)-th similarities tie may have lost a lower-index tied item to the search's own tie order: that row is
    recomputed exactly (rare: only where ties cross the cut)."""
    if sims.shape[1] > kk:
        crossing = np.nonzero(sims[:, kk - 1] == sims[:, kk])[0]
        for r in crossing:
            row = x @ q[r]
            order = np.lexsort((np.arange(len(row)), -row))[:kk + 1]
            sims[r], idx[r] = row[order], order
    order = np.lexsort((idx, -sims), axis=1)
    sims, idx = np.take_along_axis(sims, order, 1)[:, :kk], np.take_along_axis(idx, order, 1)[:, :kk]
    return sims, idx


def _drop_self(sims: np.ndarray, idx: np.ndarray, own: np.ndarray | None = None):
    """Remove each query's own id (own[i], default i) from its row; rows without it lose their last column instead."""
    q, kk = idx.shape
    is_self = idx == (np.arange(q) if own is None else own)[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), kk - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(q), drop] = False
    return sims[keep].reshape(q, kk - 1), idx[keep].reshape(q, kk - 1)


# ---------------------------------------------------------------------------- pure metrics
def average_precision_at_k(rel: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Per-query mAP@k from relevance (Q, >=k) in {0,1} and n_pos (Q,) > 0."""
    r = rel[:, :k].astype(np.float64)
    prec = np.cumsum(r, 1) / np.arange(1, r.shape[1] + 1)
    return (r * prec).sum(1) / np.minimum(n_pos, k)


def precision_at_npos(rel: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Per-query mMP@k: relevant among the first min(n_pos, k), divided by min(n_pos, k)."""
    m = np.minimum(n_pos, k)
    mask = np.arange(rel.shape[1])[None] < m[:, None]
    return (rel * mask).sum(1) / m


def retrieval_metrics(query_emb, query_labels, index_emb=None, index_labels=None, k: int = 20,
                      backend: Backend = "auto", map_at_r: bool = True,
                      query_in_index: np.ndarray | None = None) -> dict[str, float]:
    """kNN retrieval metrics with cosine similarity (embeddings are L2-normalised here).

    index_emb=None: the queries are their own index, each query excluded from its own neighbours.
    query_in_index: with an index, query i is index item query_in_index[i] (a merged index holding the queries),
    likewise excluded from its own neighbours and positives; without it no query is in the index (query/gallery).
    Returns {"map@{k}", "mmp@{k}", "r@1"} and, with map_at_r, "map@r" (MAP@R), floats in [0, 1],
    averaged over the queries that have at least one positive in the index, and "skipped": the number of
    queries without one (an int)."""
    self_search = index_emb is None
    q = _normalise(query_emb)
    x = q if self_search else _normalise(index_emb)
    ql = _as_labels(query_labels)
    xl = ql if self_search else _as_labels(index_labels)
    if len(ql) != q.shape[0] or len(xl) != x.shape[0]:
        raise ValueError(f"labels and embeddings differ in length: query {len(ql)} vs {q.shape[0]}, "
                         f"index {len(xl)} vs {x.shape[0]}")
    own = None if self_search or query_in_index is None else np.asarray(query_in_index, dtype=np.int64)
    if own is not None and (len(own) != len(ql) or own.min() < 0 or own.max() >= len(xl) or
                            (xl[own] != ql).any()):
        raise ValueError("query_in_index must give, for every query, the index item with its label")
    classes, counts = np.unique(xl, return_counts=True)
    n_pos = np.zeros(len(ql), dtype=np.int64)
    pos = np.searchsorted(classes, ql)
    found = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == ql)
    n_pos[found] = counts[pos[found]]
    if self_search or own is not None:
        n_pos -= 1
    valid = n_pos > 0
    if not valid.any():
        raise ValueError("no query has a positive in the index: every class has a single member")
    skipped = int((~valid).sum())
    if skipped:
        warnings.warn(f"retrieval_metrics: {skipped} of {len(ql)} queries have no positive "
                      f"in the index and are skipped", stacklevel=2)
    kr = int(n_pos.max()) if map_at_r else 0
    if own is None:
        _, idx = knn_search(q, None if self_search else x, k=max(k, kr), backend=backend)
    else:  # one more neighbour, then the query's own item out (by identity, as for self search)
        sims, idx = knn_search(q, x, k=min(max(k, kr) + 1, len(xl)), backend=backend)
        _, idx = _drop_self(sims, idx, own)
    rel = (xl[idx] == ql[:, None])[valid]
    n_pos = n_pos[valid]
    if rel.shape[1] < k:  # fewer candidates than k: the missing ranks are simply not relevant
        rel = np.pad(rel, ((0, 0), (0, k - rel.shape[1])))
    out = {f"map@{k}": average_precision_at_k(rel, n_pos, k).mean(),
           f"mmp@{k}": precision_at_npos(rel, n_pos, k).mean(),
           "r@1": rel[:, 0].mean()}
    if map_at_r:
        out["map@r"] = _map_at_r(rel, n_pos)
    return {**{key: float(v) for key, v in out.items()}, "skipped": skipped}


def merged_retrieval_metrics(parts: dict[str, tuple], k: int = 20, backend: Backend = "auto") -> dict[str, dict]:
    """The merged-index protocol (UnED; the official final test): every domain's queries are searched against one
    index made of every domain's index items, and a neighbour is relevant when it has the query's label AND comes
    from the query's domain. parts: {domain: (query_emb, query_labels, index_emb, index_labels)}, index_emb None
    when the queries are their own index (each query then left out of its own neighbours). Returns the
    `retrieval_metrics` of each domain's queries against the merged index."""
    codes: dict[tuple[int, int], int] = {}  # (domain, label) -> one integer: equal codes = same label and domain
    encode = lambda d, labels: np.array([codes.setdefault((d, int(c)), len(codes)) for c in _as_labels(labels)])
    index, labels, offsets, n = [], [], {}, 0
    for d, (name, (q, ql, x, xl)) in enumerate(parts.items()):
        x, xl = (q, ql) if x is None else (x, xl)
        offsets[name], n = n, n + len(xl)
        index.append(_np(_normalise(x)))
        labels.append(encode(d, xl))
    index, labels = np.concatenate(index), np.concatenate(labels)
    out = {}
    for d, (name, (q, ql, x, _)) in enumerate(parts.items()):
        own = offsets[name] + np.arange(len(ql)) if x is None else None
        out[name] = retrieval_metrics(q, encode(d, ql), index, labels, k=k, backend=backend, map_at_r=False,
                                      query_in_index=own)
    return out


def _map_at_r(rel: np.ndarray, n_pos: np.ndarray) -> float:
    r = rel.astype(np.float64) * (np.arange(rel.shape[1])[None] < n_pos[:, None])
    prec = np.cumsum(r, 1) / np.arange(1, r.shape[1] + 1)
    return float(((r * prec).sum(1) / n_pos).mean())


def _normalise(x):
    x = _as_float32(x)
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, dim=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def image_text_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@K with several captions per image.

    text_to_image[j] = the image that caption j describes. i2t: an image is a hit at K if any of its
    captions is among its K most similar captions; t2i: a caption is a hit if its image is among its
    K most similar images. Ties are ordered by index (`_ranks`: a stable sort), as for image-image retrieval: a
    caption tied with a better-indexed other caption ranks after it."""
    img = torch.as_tensor(np.asarray(_np(_normalise(image_emb))))
    txt = torch.as_tensor(np.asarray(_np(_normalise(text_emb))))
    t2i = torch.as_tensor(_as_labels(text_to_image)).long()
    if len(t2i) != txt.shape[0]:
        raise ValueError(f"text_to_image has {len(t2i)} entries for {txt.shape[0]} captions")
    if t2i.min() < 0 or t2i.max() >= img.shape[0]:
        raise ValueError(f"text_to_image must index the {img.shape[0]} images")
    sims = img @ txt.T  # (I, T)
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[t2i, torch.arange(len(t2i))] = True
    if not own.any(1).all():
        raise ValueError("every image needs at least one caption in text_to_image")
    i2t_rank = _ranks(sims).masked_fill(~own, len(t2i)).min(1).values   # the best-ranked own caption
    t2i_rank = _ranks(sims.T)[torch.arange(len(t2i)), t2i]              # the caption's own image
    out = {}
    for key in ks:
        out[f"i2t_r@{key}"] = float((i2t_rank < key).float().mean())
    for key in ks:
        out[f"t2i_r@{key}"] = float((t2i_rank < key).float().mean())
    return out


def _ranks(sims: torch.Tensor) -> torch.Tensor:
    """(Q, N) similarities -> (Q, N) 0-based rank of each item for each query: similarity descending, then index
    ascending (a stable sort)."""
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(sims.shape[1]).expand_as(order).contiguous())


def zero_shot_accuracy(image_emb, labels, class_text_emb) -> float:
    """Accuracy of argmax_c cos(image, class prompt c); labels index the rows of class_text_emb."""
    img = _np(_normalise(image_emb))
    cls = _np(_normalise(class_text_emb))
    return float(((img @ cls.T).argmax(1) == _as_labels(labels)).mean())
