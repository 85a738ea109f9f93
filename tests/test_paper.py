"""configs/paper/: the paper's baseline and full method with the official hyper-parameters, and the kit's protocol on
the paper's data, each loaded by the kit's own loaders (config.load_config, study.load_study, through
resolve.resolve_file) without the data; the official values checked (docs/paper.md)."""
import json
import re
from pathlib import Path

import pytest

from infusing_kit.__main__ import main
from infusing_kit.protocol.resolve import global_steps, resolve_file

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
FILES = ("sop-baseline.toml", "sop-full-method.toml", "sop-kit-protocol.toml")

# the official code (scripts/full_method.sh, baseline.sh, configs/config_train_vit.py; README's example run)
OFFICIAL = dict(batch_size=128, lr_backbone=1e-5, lr_head=1e-3, weight_decay=1e-6, scale=16.0, margin=0.0,
                classifier="normface", ce_weight=1.0, lp_ft_steps=0, freeze_blocks=-1, lora_rank=0, average="none")
GLOBAL_STEPS = 25167       # 3 epochs of sop + our_imagenet_split at 128 images
TARGET_STEPS = 12584       # of which target batches under round robin (target first)


def test_every_paper_file_loads_without_its_data():
    for name in FILES:
        r = resolve_file(PAPER / name)
        assert r["model"] == {"name": "ViT-B-16-SigLIP", "pretrained": "webli"}, name
        assert r["data"]["root"].startswith("/DATA/"), "data paths hang from the DATA placeholder root"
        assert r["data"]["target"]["train"]["path"].endswith("array_records/sop/train")
        assert r["data"]["generic"]["train"]["path"].endswith("array_records/our_imagenet_split/train")
        assert r["data"]["text"]["test"]["format"] == "text_embeddings"
        # the release's final test: cars, sop, inshop, inat, imagenet, food2k; flickr30k, mscoco (docs/paper.md)
        tests = r["data"]["tests"]
        assert {n: t["kind"] for n, t in tests.items()} == {"cars": "image", "inshop": "image", "inat": "image",
                                                              "food2k": "image", "mscoco": "text"}, name
        assert tests["inshop"]["query"]["path"].endswith("array_records/inshop/test")
        assert tests["inshop"]["index"]["path"].endswith("array_records/inshop/index")
        assert tests["mscoco"]["gt"].endswith("text_image/mscoco/mscoco_gt.npy")
        print(name, json.dumps(r, indent=1, default=str)[:2000])
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a run requires the files
        resolve_file(PAPER / "sop-full-method.toml", data=True)


def test_the_full_method_has_the_official_values():
    r = resolve_file(PAPER / "sop-full-method.toml")
    t = r["train"]
    assert {k: t[k] for k in OFFICIAL} == OFFICIAL
    assert t["l2sp"] == 1e5 and t["l2sp_form"] == "mean" and t["l2sp_split_qkv"] is True
    assert t["distill"] == 1000.0 and t["distill_kind"] == "mse"
    assert t["sampler"] == "round_robin" and t["select"] == "mean_map@20"  # best_val_knn_on = "all"
    assert t["steps"] == TARGET_STEPS and r["schedule"]["global_steps"] == GLOBAL_STEPS
    assert r["schedule"]["generic_steps"] == GLOBAL_STEPS - TARGET_STEPS
    assert r["schedule"]["training_images"] == GLOBAL_STEPS * 128
    assert 2 * t["eval_every"] == 764  # official log_eval_steps, in global steps
    assert r["post_hoc"] is None and r["data"]["merged_index"] is True and r["seed"] == 0
    # a constant schedule without warm-up: the kit's AdamW has no schedule field at all
    assert not any(re.search("warm|schedule|decay_steps|cosine", k) for k in t)


def test_the_baseline_has_the_official_values():
    r = resolve_file(PAPER / "sop-baseline.toml")
    t = r["train"]
    assert {k: t[k] for k in OFFICIAL} == OFFICIAL
    assert t["l2sp"] == 0 and t["distill"] == 0 and t["select"] == "fine_map@20"  # best_val_knn_on = "in-domain"
    # the official baseline's 12,584 classifier steps (its 12,583 zero-loss generic steps cannot be expressed)
    assert t["sampler"] == "target_only" and t["steps"] == TARGET_STEPS and r["schedule"]["global_steps"] == TARGET_STEPS


def test_the_kit_protocol_study_searches_the_strengths_from_the_official_values():
    r = resolve_file(PAPER / "sop-kit-protocol.toml")
    assert r["kind"] == "study" and r["protocol"]["baseline"] == "naive"
    assert r["protocol"]["calibration_steps"] == TARGET_STEPS
    m = r["methods"]
    assert set(m) == {"naive", "paper", "l2sp", "distill"}
    assert [s["field"] for s in m["naive"]["search"]] == ["lr_backbone", "lr_head"]
    assert [s["field"] for s in m["paper"]["search"]] == ["l2sp", "distill"]
    assert (m["paper"]["train"]["l2sp"], m["paper"]["train"]["distill"]) == (1e5, 1000.0)
    for name, method in m.items():
        assert {k: method["train"][k] for k in OFFICIAL} == OFFICIAL, name
        assert method["train"]["steps"] == TARGET_STEPS
    assert m["paper"]["schedule"]["global_steps"] == GLOBAL_STEPS


def test_the_check_command_prints_the_resolved_settings(capsys):
    assert main(["check", "--config", str(PAPER / "sop-full-method.toml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["l2sp"] == 1e5 and out["schedule"]["global_steps"] == GLOBAL_STEPS


def test_with_stand_in_files_the_full_check_passes(tmp_path):
    """Every path the file names, made as an empty stand-in under a substituted DATA root: the loader's check of
    the files passes (nothing is read: load_config only resolves and checks paths)."""
    r = resolve_file(PAPER / "sop-full-method.toml")
    root = r["data"]["root"]
    parts = [part for group in ("target", "generic", "text") for part in r["data"][group].values()]
    for t in r["data"]["tests"].values():  # [data.tests.NAME]: one part, or query and index
        parts += [t["query"], t["index"]] if "query" in t else [t]
    for part in parts:
        for key in ("path", "root", "embeddings", "gt"):
            if key in part:
                p = tmp_path / Path(part[key]).relative_to(root)
                if key == "root" or part["format"] == "array_record":
                    p.mkdir(parents=True, exist_ok=True)
                else:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.touch()
    text = (PAPER / "sop-full-method.toml").read_text().replace(f'root = "{root}"', f'root = "{tmp_path}"')
    cfg = tmp_path / "sop-full-method.toml"
    cfg.write_text(text)
    full = resolve_file(cfg, data=True)
    assert full["train"] == r["train"] and full["data"]["target"]["train"]["path"] == str(tmp_path / "array_records/sop/train")
    assert full["data"]["tests"]["inshop"]["index"]["path"] == str(tmp_path / "array_records/inshop/index")


def test_global_steps_of_the_fixed_samplers():
    from dataclasses import replace

    from infusing_kit.datasets.sampling import schedule
    from infusing_kit.train import TrainConfig
    cfg = TrainConfig(steps=7, distill=1.0, sampler="round_robin")
    assert global_steps(cfg) == len(list(schedule("round_robin", 0, (10, 10), 7))) == 13
    assert global_steps(replace(cfg, sampler="target_only", distill=0.0)) == 7
    assert global_steps(replace(cfg, sampler="balanced")) is None
