"""Several test sets per run: a config's `[data.tests.NAME]` tables, their metrics and the mean over datasets.

The paper's release tests one run on six image domains (cars, sop, inshop, inat, imagenet, food2k) and on two
image-text sets (Flickr30k, MSCOCO). A config names its target, generic and text test as before and any number of
extra test sets beside them, one table each:

  [data.tests.cars]                  # image-image retrieval, like [data.generic] test
  kind = "image"
  format = "split_file"; path = "info_files/cars/test.json"; root = "images"     (any image format of formats.FORMATS)
  [data.tests.inshop]                # queries against a separate index (gallery)
  kind = "image"
  query = {format = ...}; index = {format = ...}
  [data.tests.mscoco]                # image-text retrieval, like [data.text] test
  kind = "text"
  format = "text_embeddings"; path = ...; embeddings = ...; gt = ...             (or caption_csv, karpathy_json)

metrics.json then has a "tests" section (absent without [data.tests]: a config without it writes the metrics.json
it always did, and the existing keys never change with it either):
  "sets": {NAME: {"kind", "from", "size"}}, "averages": {AVERAGE: [the groups it averages]},
  "pretrained" / "finetuned": {NAME: the metrics of its kind (image: map@20, mmp@20, r@1, skipped, as
      "generic_image"; text: i2t_r@1/5/10, t2i_r@1/5/10, as "image_text"),
      "average_image", "average_image_ood", "average_text": the mean over datasets (`AVERAGES`), and with
      [data] merged_index = true and an extra image set also "merged" (every image domain's queries against one
      index of all of them: "NAME/map@20", ...) and "average_merged"} (null in a run without test metrics).
  The groups "pretrained" / "finetuned" of metrics.json itself keep their keys and values (their "merged" is still
  the target and generic tests' own merged index).

Which sets enter each mean (`AVERAGES`), and why:
- average_image: every image-image test domain of the run: [data.target] test ("in_domain"), [data.generic] test
  ("generic_image") and every kind = "image" set. This is the official `knn_utils.average_datasets`: it averages
  over every dataset of `knn_eval_names`, and the release's example run lists the target among them (sop, fine-tuned
  on, with cars, inshop, inat, imagenet, food2k);
- average_image_ood: the same without the target's test, the domains the fine-tuning never trained on (the
  generic one and the extra ones). Both are reported because the official average includes the target while an
  out-of-domain number should not; each names its members in "averages";
- average_text: [data.text] test ("image_text") and every kind = "text" set. The official code reports each
  image-text set alone (`text_eval_utils`) and averages none; the kit averages them by the same rule;
- average_merged: the merged-index results of every image domain (the official "common" average; the release's
  scripts turn the common kNN off for every split, disabled_merged_knns, so its reported numbers are the separate
  ones above).
Each metric is averaged separately, as the official code does: every set's value rounded to 3 decimals, their plain
mean (each dataset weighs the same, whatever its size) rounded to 3 decimals (`official_mean`). The per-set values
in metrics.json are not rounded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..metrics import K

KINDS = ("image", "text")
TEXT_FORMATS = ("caption_csv", "karpathy_json", "text_embeddings")  # the formats that read images with captions
BUILT_IN = {"in_domain": "[data.target] test", "generic_image": "[data.generic] test", "image_text": "[data.text] test"}
IMAGE_KEYS = (f"map@{K}", f"mmp@{K}", "r@1")                    # averaged (not "skipped", a count)
TEXT_KEYS = tuple(f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
AVERAGES = {"average_image": ("image", ("in_domain", "generic_image")),  # name: (kind, built-in groups it includes)
            "average_image_ood": ("image", ("generic_image",)),
            "average_text": ("text", ("image_text",))}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TestSet:
    """An extra test set of a run (`Domains.tests`): its kind ("image" or "text") and its split (a data split, an
    `containers.QueryIndex`, a caption split or an `containers.TextProbe`)."""
    __test__ = False  # (not a pytest class)
    kind: str
    split: object


def kind_formats(kind: str) -> tuple[str, ...]:
    """The config formats a test set of this kind may have."""
    from .formats import FORMATS
    return TEXT_FORMATS if kind == "text" else tuple(f for f in FORMATS if f not in TEXT_FORMATS)


# ---------------------------------------------------------------------------- the config's [data.tests] tables
def check_tests(tests, root, path, part) -> dict:
    """[data.tests] of a config file: each NAME a table with kind = "image" | "text" and one data part (format, path,
    ...) or, for an image set, query = {...} and index = {...}. part: config._part (checks keys, resolves and checks
    paths). Returns {NAME: {"kind", ...the resolved part}}."""
    from .formats import check_table
    if not isinstance(tests, dict) or not tests:
        raise ValueError(f"{path} [data.tests] must hold one table per extra test set, e.g. [data.tests.cars] with "
                         'kind = "image", format = "split_file", path = "..."; got ' + repr(tests))
    out = {}
    for name, spec in tests.items():
        where = f"{path} [data.tests.{name}]"
        if not NAME.match(name) or name in BUILT_IN or name == "merged" or name.startswith("average"):
            raise ValueError(f"{where}: {name!r} cannot name a test set: use letters, digits, '_', '-' or '.', not "
                             f"{sorted(BUILT_IN)}, 'merged' or a name starting with 'average' (metrics.json's groups)")
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a table (kind = \"image\" or \"text\", format = ..., path = ...), got "
                             f"{spec!r}")
        if spec.get("kind") not in KINDS:
            got = "missing" if "kind" not in spec else f"{spec['kind']!r}"
            raise ValueError(f"{where} kind is {got}: write kind = \"image\" (image-image retrieval, like [data.generic] "
                             "test) or kind = \"text\" (image-text retrieval, like [data.text] test)")
        kind, rest = spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
        if kind == "text" and ("query" in rest or "index" in rest):
            raise ValueError(f"{where}: a text test set is one split of images with captions (format = ..., path = "
                             "...); query = / index = are for kind = \"image\" sets")
        if kind == "image" and ("query" in rest or "index" in rest):
            check_table(rest, {"query": None, "index": None}, where, required={"query", "index"})
            subs = {k: (rest[k], f"{where} {k}") for k in ("query", "index")}
        else:
            subs = {None: (rest, where)}
        resolved = {}
        for key, (sub, w) in subs.items():
            fmt = sub.get("format") if isinstance(sub, dict) else None
            if fmt is not None and fmt not in kind_formats(kind) and fmt in kind_formats("image" if kind == "text" else
                                                                                         "text"):
                raise ValueError(f"{w}: format {fmt!r} does not fit kind = {kind!r}; a {kind} test set has one of "
                                 f"{sorted(kind_formats(kind))} (or set kind = "
                                 f"{'image' if kind == 'text' else 'text'!r})")
            resolved[key] = part(sub, root, w)  # unknown keys and formats, missing files: named by config._part
        out[name] = {"kind": kind, **(resolved[None] if None in resolved else resolved)}
    return out


def read_tests(cfg: dict) -> dict[str, TestSet]:
    """The extra test sets of a checked config, opened (formats.read_split) in the file's order."""
    from .formats import read_split
    tests = cfg["data"].get("tests") or {}
    return {name: TestSet(spec["kind"], read_split(cfg, "tests", name)) for name, spec in tests.items()}


def check_data(domains, data: dict, where: str, embed_dim) -> None:
    """Before any model work: every image set has a query with a positive, every text set has captions (of the
    model's width when precomputed), and no test image is in a training split, nor (merged_index) in another test
    domain (same pixels; [data] allow_leakage = true skips this). embed_dim(): the model's embedding width."""
    from ..datasets.leakage import shared_images
    from ..datasets.precheck import _has_positive
    hashes, problems = {}, []
    for name, t in domains.tests.items():
        w = f"{where} [data.tests.{name}]"
        if t.kind == "image" and not _has_positive(t.split):
            raise ValueError(f"{w}: no query has a positive (every class has a single image, or no query's class is "
                             "in the index), so retrieval cannot be measured; give it two images of some classes")
        if t.kind == "text" and getattr(t.split, "caption_image", None) is None:
            raise ValueError(f"{w}: a text test set needs captions ({sorted(TEXT_FORMATS)})")
        if hasattr(t.split, "text_embeddings"):
            from ..datasets.textprobe import check_width
            check_width(t.split, embed_dim(), "the model", f"{w} {data['tests'][name].get('embeddings')}")
    if data.get("allow_leakage", False):
        return
    train = [("[data.target] train", domains.target_train), ("[data.generic] train", domains.generic_train)]
    merged = [("[data.target] test", domains.target_test), ("[data.generic] test", domains.generic_test)]
    for name, t in domains.tests.items():
        in_index = t.kind == "image" and data.get("merged_index")  # one index of every image domain
        for i, (other, split) in enumerate(train + (merged if in_index else [])):
            same = shared_images(split, t.split, hashes)
            if same:
                eg = "; ".join(f"{x} = {y}" for x, y in same[:3])
                problems.append(f"{len(same)} image(s) of [data.tests.{name}] are also in {other} (same pixels), e.g. "
                                f"{eg}" + (" (merged_index = true puts both in one index)" if i >= len(train) else ""))
        if in_index:
            merged.append((f"[data.tests.{name}]", t.split))
    if problems:
        raise ValueError(f"{where}: the test sets leak:\n  " + "\n  ".join(problems) + "\nGive each test set its own "
                         "images, or set [data] allow_leakage = true to run anyway")


# ---------------------------------------------------------------------------- metrics
def official_mean(values) -> float:
    """The official `average_datasets`: each dataset's value rounded to 3 decimals (as `compute_knn_metrics` returns
    it), their plain mean rounded to 3 decimals."""
    return float(np.round(np.mean(np.round(np.asarray(values, dtype=np.float64), 3)), 3))


def members(domains) -> dict[str, list[str]]:
    """The groups each average takes (`AVERAGES`; "average_merged" with merged_index and an extra image set)."""
    out = {avg: list(built) + [n for n, t in domains.tests.items() if t.kind == kind]
           for avg, (kind, built) in AVERAGES.items()}
    if domains.merged_index and any(t.kind == "image" for t in domains.tests.values()):
        out["average_merged"] = out["average_image"]
    return out


def evaluate_tests(vlm, domains, base: dict, progress: bool = False, embedded: dict | None = None) -> dict:
    """The metrics of every extra test set and the averages, for `base` = evaluation.evaluate(vlm, domains) of the
    same model. embedded: the target and generic tests' embeddings evaluate kept (else made again for the merged
    index)."""
    from ..evaluation import _embedded, text_side
    from ..metrics import image_text_recall, merged_retrieval_metrics, retrieval_metrics
    from ..models import embed_images
    out, emb = {}, {}
    for name, t in domains.tests.items():
        if t.kind == "image":
            emb[name] = _embedded(vlm, t.split, progress)
            m = retrieval_metrics(*emb[name], k=K)
            out[name] = {k: m[k] for k in (*IMAGE_KEYS, "skipped")}
        else:
            pairs = embed_images(vlm, t.split, progress=progress)
            out[name] = image_text_recall(pairs, text_side(vlm, t.split, progress), t.split.caption_image)
    groups = {**base, **out}
    who = members(domains)
    for avg, (kind, _) in AVERAGES.items():
        keys = IMAGE_KEYS if kind == "image" else TEXT_KEYS
        out[avg] = {k: official_mean([groups[g][k] for g in who[avg]]) for k in keys}
    if "average_merged" in who:
        embedded = embedded or {"in_domain": _embedded(vlm, domains.target_test, progress),
                                "generic_image": _embedded(vlm, domains.generic_test, progress)}
        parts = {"in_domain": embedded["in_domain"], "generic_image": embedded["generic_image"], **emb}
        merged = merged_retrieval_metrics(parts, k=K)
        out["merged"] = {f"{n}/{k}": m[k] for n, m in merged.items() for k in IMAGE_KEYS}
        out["average_merged"] = {k: official_mean([merged[n][k] for n in parts]) for k in IMAGE_KEYS}
    return out


def pretrained_tests(vlm, domains, base: dict, identity: dict) -> dict:
    """evaluate_tests of the starting model; inside a comparison computed once per starting weights and test data
    (`budget.cached`), as experiment._pretrained_test is."""
    import os

    from ..budget import CACHE, cached, key_of
    if not os.environ.get(CACHE):
        return evaluate_tests(vlm, domains, base)
    key = key_of("pretrained-tests", identity, base, domains.merged_index,
                 [s.fingerprint() for s in (domains.target_test, domains.generic_test)],
                 [(n, t.kind, t.split.fingerprint()) for n, t in domains.tests.items()])
    return cached("pretrained-tests", key, lambda: evaluate_tests(vlm, domains, base))


def section(domains, before: dict | None, after: dict | None) -> dict:
    """metrics.json's "tests" (module docstring); {} for a run without extra test sets."""
    if not domains.tests:
        return {}
    sets = {n: {"kind": t.kind, "from": f"[data.tests.{n}]", "size": len(t.split)} for n, t in domains.tests.items()}
    return {"tests": {"sets": sets, "averages": members(domains), "pretrained": before, "finetuned": after}}


# ---------------------------------------------------------------------------- output
def summary(metrics: dict) -> dict:
    """The "tests" section's numbers rounded to 3 decimals (the CLI's summary of a run); {} without one."""
    t = metrics.get("tests")
    if not t:
        return {}
    return {"tests": {when: {g: {k: round(v, 3) for k, v in m.items()} for g, m in (t[when] or {}).items()}
                      for when in ("pretrained", "finetuned")}}


def headline(group: str, metrics: dict) -> str:
    """The metric a table shows of a group: mAP@20 of an image group, image->text R@1 of a text group."""
    return f"map@{K}" if f"map@{K}" in metrics else "i2t_r@1"


def markdown_table(rows: list[dict]) -> str:
    """Markdown: per method (results.label), the mean over seeds of each test set's and each average's change
    (fine-tuned minus pretrained, in points x 100) of its headline metric; "" when no row has extra test sets."""
    from .results import label
    rows = [r for r in rows if (r.get("tests") or {}).get("finetuned") and r["tests"].get("pretrained")]
    if not rows:
        return ""
    groups = list(dict.fromkeys(g for r in rows for g in r["tests"]["finetuned"] if g != "merged"))
    cell = {}
    for r in rows:
        t = r["tests"]
        for g in groups:
            if g in t["finetuned"]:
                key = headline(g, t["finetuned"][g])
                cell.setdefault((label(r), g), []).append(t["finetuned"][g][key] - t["pretrained"][g][key])
    methods = list(dict.fromkeys(label(r) for r in rows))
    names = [f"{g} {headline(g, next(r['tests']['finetuned'][g] for r in rows if g in r['tests']['finetuned']))}"
             for g in groups]
    lines = ["| method | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(groups)]
    for m in methods:
        seeds = len({r["seed"] for r in rows if label(r) == m})
        vals = [f"{100 * np.mean(cell[(m, g)]):+.1f}" if (m, g) in cell else "n/a" for g in groups]
        lines.append(f"| {m} | {seeds} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
