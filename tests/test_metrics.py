"""Retrieval metrics against independent references.

Oracles: a brute-force loop that follows method.md section 6 word by word (full sort of all
similarities, self removed by identity), scikit-learn's average_precision_score (equal to mAP@k
when k covers the whole index) and 1-NN classifier, and a plain loop for image-text recall.
Data are random Gaussian embeddings (tie-free with probability 1) unless a test makes ties on purpose.
"""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.neighbors import KNeighborsClassifier

from infusing_kit.metrics import (image_text_recall, knn_search, merged_retrieval_metrics, retrieval_metrics,
                                  zero_shot_accuracy)


def _data(n, d, n_classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, n_classes, n)


def brute_force(q, ql, x=None, xl=None, k=20, own=None):
    """Per method.md section 6, one query at a time. own[i]: the index item that is query i (left out)."""
    self_search = x is None
    if self_search:
        x, xl, own = q, ql, np.arange(len(q))
    aps, mps, r1, apr, skipped = [], [], [], [], 0
    for i in range(len(q)):
        sims = x @ q[i]
        order = [j for j in np.argsort(-sims, kind="stable") if own is None or j != own[i]]
        rel = [int(xl[j] == ql[i]) for j in order]
        n_pos = sum(rel)
        if n_pos == 0:
            skipped += 1
            continue
        m = min(n_pos, k)
        hits, ap = 0, 0.0
        for j in range(min(k, len(rel))):
            if rel[j]:
                hits += 1
                ap += hits / (j + 1)
        aps.append(ap / m)
        mps.append(sum(rel[:m]) / m)
        r1.append(rel[0])
        hits, ap = 0, 0.0
        for j in range(n_pos):
            if rel[j]:
                hits += 1
                ap += hits / (j + 1)
        apr.append(ap / n_pos)
    return {f"map@{k}": np.mean(aps), f"mmp@{k}": np.mean(mps), "r@1": np.mean(r1), "map@r": np.mean(apr),
            "skipped": skipped}


@pytest.mark.filterwarnings("ignore:retrieval_metrics")  # some random classes have one member
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("n,n_classes,k", [(300, 12, 20), (7, 3, 20), (120, 40, 5), (200, 4, 100)])
def test_self_retrieval_matches_brute_force(backend, n, n_classes, k):
    x, y = _data(n, 16, n_classes, seed=n + k)
    got = retrieval_metrics(x, y, k=k, backend=backend)
    want = brute_force(x, y, k=k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_query_vs_index_matches_brute_force(backend):
    q, ql = _data(50, 8, 6, seed=1)
    x, xl = _data(400, 8, 6, seed=2)
    got = retrieval_metrics(q, ql, x, xl, k=20, backend=backend)
    want = brute_force(q, ql, x, xl, k=20)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_merged_index_matches_brute_force(backend):
    """UnED's merged protocol: each domain's queries against one index of every domain; relevant = same label and
    same domain (the two domains share label values on purpose). A leave-one-out domain leaves each query's own item
    out by identity; a query/gallery domain keeps the whole index."""
    a, al = _data(120, 8, 6, seed=3)            # domain "fine": its own index
    q, ql = _data(40, 8, 5, seed=4)             # domain "shop": queries ...
    g, gl = _data(90, 8, 5, seed=5)             # ... and a separate gallery
    got = merged_retrieval_metrics({"fine": (a, al, None, None), "shop": (q, ql, g, gl)}, k=10, backend=backend)
    x = np.concatenate([a, g])
    xl = np.array([f"fine:{c}" for c in al] + [f"shop:{c}" for c in gl])
    want = {"fine": brute_force(a, np.array([f"fine:{c}" for c in al]), x, xl, k=10, own=np.arange(len(a))),
            "shop": brute_force(q, np.array([f"shop:{c}" for c in ql]), x, xl, k=10)}
    for domain in want:
        for key in ("map@10", "mmp@10", "r@1", "skipped"):
            assert got[domain][key] == pytest.approx(want[domain][key], abs=1e-9), (domain, key)
    # a query of one domain never counts another domain's item with its label as relevant: on its own index the
    # numbers differ, since the other domain's items then are not in the way
    alone = retrieval_metrics(a, al, k=10, backend=backend, map_at_r=False)
    assert alone["map@10"] != pytest.approx(got["fine"]["map@10"], abs=1e-6)


def test_map_equals_sklearn_average_precision_when_k_covers_index():
    x, y = _data(150, 8, 5, seed=3)
    n = len(x)
    got = retrieval_metrics(x, y, k=n - 1)[f"map@{n - 1}"]
    aps = []
    for i in range(n):
        mask = np.arange(n) != i
        aps.append(average_precision_score(y[mask] == y[i], x[mask] @ x[i]))
    assert got == pytest.approx(np.mean(aps), abs=1e-9)


def test_r_at_1_equals_sklearn_1nn_accuracy():
    q, ql = _data(80, 8, 5, seed=4)
    x, xl = _data(300, 8, 5, seed=5)
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x, xl)
    assert retrieval_metrics(q, ql, x, xl)["r@1"] == pytest.approx(knn.score(q, ql))


def test_singleton_class_queries_are_skipped_with_a_warning():
    x, y = _data(60, 8, 5, seed=6)
    y[0] = 99  # a class with one member: no positive for query 0
    with pytest.warns(UserWarning, match="1 of 60 queries"):
        got = retrieval_metrics(x, y)
    want = brute_force(x, y)  # skips it too
    assert got["map@20"] == pytest.approx(want["map@20"])


def test_all_singletons_raise():
    x, _ = _data(10, 4, 1, seed=7)
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(x, np.arange(10))


def test_self_is_removed_by_identity_not_position_with_duplicates():
    x, y = _data(40, 8, 4, seed=8)
    x[1] = x[0]  # exact duplicate: query 0 and 1 tie at similarity 1
    x[2] = x[0]
    y[1] = y[2] = y[0]
    _, idx = knn_search(x, k=5)
    assert not (idx == np.arange(40)[:, None]).any(), "a query was returned as its own neighbour"
    assert set(idx[0, :2]) == {1, 2} and set(idx[1, :2]) == {0, 2}
    assert retrieval_metrics(x, y)["r@1"] >= brute_force(x, y)["r@1"] - 1e-9


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_faiss_and_torch_agree_and_chunks_do_not_matter(chunk):
    q, _ = _data(5, 32, 2, seed=9)  # fewer queries than a chunk
    x, _ = _data(1000, 32, 2, seed=10)
    sf, jf = knn_search(q, x, k=10, backend="faiss")
    st, jt = knn_search(torch.from_numpy(q), torch.from_numpy(x), k=10, backend="torch", chunk_size=chunk)
    brute = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(jf, brute)
    np.testing.assert_array_equal(jt, brute)
    np.testing.assert_allclose(sf, st, atol=1e-5)


def test_inputs_may_be_torch_tensors_and_unnormalised():
    x, y = _data(100, 8, 5, seed=11)
    a = retrieval_metrics(x, y)
    b = retrieval_metrics(torch.from_numpy(x * 3.0), torch.from_numpy(y))
    assert a == pytest.approx(b)
    assert all(0.0 <= v <= 1.0 for v in a.values())


def test_label_length_mismatch_is_a_clear_error():
    x, y = _data(10, 4, 2, seed=12)
    with pytest.raises(ValueError, match="differ in length"):
        retrieval_metrics(x, y[:5])


def _recall_loop(img, txt, t2i, k):
    sims = img @ txt.T
    i2t = np.mean([len(set(np.argsort(-sims[i])[:k]) & set(np.flatnonzero(t2i == i))) > 0 for i in range(len(img))])
    t2i_hits = np.mean([t2i[j] in np.argsort(-sims[:, j])[:k] for j in range(len(txt))])
    return i2t, t2i_hits


def test_image_text_recall_matches_loop_with_several_captions():
    img, _ = _data(30, 16, 1, seed=13)
    t2i = np.repeat(np.arange(30), 3)
    rng = np.random.default_rng(14)
    txt = img[t2i] + 0.9 * rng.standard_normal((90, 16)).astype(np.float32)
    got = image_text_recall(img, txt, t2i, ks=(1, 5, 10))
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    for k in (1, 5, 10):
        i2t, t2i_r = _recall_loop(img, txt, t2i, k)
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_r@{k}"] == pytest.approx(t2i_r)
    assert 0 < got["i2t_r@1"] < 1  # the data are neither trivial nor hopeless


def test_image_text_recall_checks_mapping():
    img, _ = _data(4, 8, 1, seed=15)
    with pytest.raises(ValueError, match="at least one caption"):
        image_text_recall(img, img[:3], [0, 1, 2])
    with pytest.raises(ValueError, match="index the 4 images"):
        image_text_recall(img, img, [0, 1, 2, 7])


def test_zero_shot_accuracy():
    cls, _ = _data(5, 8, 1, seed=16)
    labels = np.array([0, 1, 2, 3, 4, 0])
    assert zero_shot_accuracy(cls[labels], labels, cls) == 1.0
    assert zero_shot_accuracy(cls[labels], (labels + 1) % 5, cls) == 0.0


@pytest.mark.filterwarnings("ignore:retrieval_metrics")
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_ties_follow_the_documented_order_in_every_backend(backend):
    # 120 embeddings drawn from only 6 distinct vectors: almost every similarity ties. The brute force orders
    # ties by index with a stable sort (the documented rule); the kit must agree exactly, cut included.
    base, _ = _data(6, 8, 1, seed=17)
    rng = np.random.default_rng(18)
    x = base[rng.integers(0, 6, 120)]
    y = rng.integers(0, 5, 120)
    got = retrieval_metrics(x, y, k=10, backend=backend)
    assert got == pytest.approx(brute_force(x, y, k=10))
    q = x[:7]
    _, idx = knn_search(q, x, k=9, backend=backend)
    brute = np.stack([np.lexsort((np.arange(len(x)), -(x @ v)))[:9] for v in q])
    np.testing.assert_array_equal(idx, brute)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_a_collapsed_model_scores_chance_level(backend):
    # every image at one point: no metric may reward the query (ties never count in its favour)
    y = np.repeat(np.arange(40), 10)
    got = retrieval_metrics(np.ones((400, 8), np.float32), y, k=20, backend=backend)
    assert got["r@1"] == pytest.approx(1 / 40, abs=0.01) and got["mmp@20"] < 0.05, got
    rec = image_text_recall(np.ones((500, 8)), np.ones((1000, 8)), np.repeat(np.arange(500), 2))
    assert rec["i2t_r@1"] == pytest.approx(2 / 1000) and rec["t2i_r@1"] == pytest.approx(1 / 500), rec
    assert rec["i2t_r@10"] <= 0.011 and rec["t2i_r@10"] <= 0.021, rec


def test_image_text_recall_breaks_ties_by_index_like_a_stable_sort():
    base, _ = _data(4, 8, 1, seed=19)
    rng = np.random.default_rng(20)
    img = base[rng.integers(0, 4, 30)]
    t2i = np.repeat(np.arange(30), 2)
    txt = base[rng.integers(0, 4, 60)]
    got = image_text_recall(img, txt, t2i, ks=(1, 5))
    sims = img @ txt.T
    for k in (1, 5):
        i2t = np.mean([len(set(np.argsort(-sims[i], kind="stable")[:k]) & set(np.flatnonzero(t2i == i))) > 0
                       for i in range(30)])
        t2i_r = np.mean([t2i[j] in np.argsort(-sims[:, j], kind="stable")[:k] for j in range(60)])
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i_r)


def test_skipped_queries_are_counted_in_the_result():
    x, y = _data(30, 8, 3, seed=21)
    y[0] = 99  # a class with one member: no positive for that query
    with pytest.warns(UserWarning, match="1 of 30"):
        assert retrieval_metrics(x, y)["skipped"] == 1
    assert retrieval_metrics(x[1:], y[1:])["skipped"] == 0
