"""Input pipeline: does loading keep the train step busy? Ratios measured within one run.

  python benchmarks/bench_pipeline.py [--model ViT-B-32@112] [--images 2048] [--batch 64] [--steps 12]
                                      [--workers N] [--device cpu] [--rss]

On a generated folder of JPEGs (500 x 375, like ImageNet / SOP photos), with the kit's own path
(data.image_folder -> FileSplit: torchvision.io decode + resize in DataLoader workers, uint8 batches, pinned
memory on a GPU, augmentation on the device):
1. loader alone: img/s of the decoded, resized uint8 batches;
2. train step on synthetic tensors: the kit's train() on the same images held in memory (no decoding);
3. train step fed by the loader: train() on the FileSplit; ratio 3 / 2 (goal >= 0.9: loading is not the
   bottleneck).
--rss: peak resident memory of embedding a 1k vs a 10k image folder in a fresh process each (it must not grow
with the dataset: FileSplit streams, nothing is held).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_jpegs(root: Path, n: int, classes: int = 32, size=(375, 500), seed: int = 0, start: int = 0) -> Path:
    """n JPEG photos-to-be (smooth colour fields with noise, so they compress like photos), in class folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for i in range(n):
        c = i % classes
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        img = (base + 60 * np.sin(xx[..., None] / (20 + c) + rng.random(3) * 6) +
               rng.normal(0, 12, (*size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{c:03d}" / f"{start + i:06d}.jpg", quality=90)
    return root


def loader_rate(split, batch: int, steps: int, workers: int | None) -> float:
    from infusing_kit.datasets.sampling import batches
    n, t0 = 0, None
    for i, (_, _, _, images) in enumerate(batches((split, None), "target_only", 0, batch, steps + 2, workers=workers)):
        if i == 2:
            t0, n = time.perf_counter(), 0
        n += len(images)
    return n / (time.perf_counter() - t0)


METHODS = {"naive": {}, "full": {"l2sp": 10.0, "distill": 1.0, "sampler": "round_robin"}}


def train_rate(vlm, split, batch: int, steps: int, device: str, method: str = "naive", teacher=None) -> float:
    from infusing_kit.train import TrainConfig, TrainState, train
    times = []

    def clock(state: TrainState):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    cfg = TrainConfig(steps=steps + 2, batch_size=batch, eval_every=0, ckpt_every=0, log_every=10**6,
                      lr_backbone=1e-5, **METHODS[method])
    extra = {"generic": split, "teacher": teacher} if method == "full" else {}
    start = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    train(vlm, split, cfg, hooks=(clock,), progress=False, **extra)  # (the full method: generic = the same images)
    vlm.visual.load_state_dict(start)  # the next measurement starts from the same (pretrained) weights
    return batch * (len(times) - 3) / (times[-1] - times[2])


def peak_rss_embedding(folder: Path, size: int) -> float:
    """Peak RSS (MB) of a fresh process that embeds every image of `folder` with a tiny model, and of its largest
    loader worker. The process's own peak is VmHWM: getrusage's ru_maxrss survives exec, so it reported this
    benchmark's own peak (3.1 GB, the same for 1k and 10k images) instead of the child's."""
    code = (f"import resource, torch; from infusing_kit import data, models; torch.manual_seed(0); "
            f"v = models.load_model('toy-clip-tiny', None); s = data.image_folder({str(folder)!r}, {size}, check=False); "
            f"e = models.embed_images(v, s, batch_size=128, progress=False); "
            f"hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            f"print(int(hwm) / 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, e.shape[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32@112", help="open_clip name[@input px]")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: sampling.default_workers())")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="naive", choices=sorted(METHODS),
                    help="full: L2-SP + distillation to pre-extracted teacher embeddings, round robin")
    ap.add_argument("--rss", action="store_true", help="also peak RSS of 1k vs 10k images")
    args = ap.parse_args()
    from infusing_kit.datasets import data, sampling
    from infusing_kit.models import load_model
    name, _, px = args.model.partition("@")
    torch.manual_seed(0)
    vlm = load_model(name, None, device=args.device, image_size=int(px) if px else None)
    workers = sampling.default_workers() if args.workers is None else args.workers
    print(f"model {args.model} on {args.device}, batch {args.batch}, {os.cpu_count()} cores, {workers} loader workers, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        root = make_jpegs(Path(tmp) / "jpegs", args.images)
        print(f"generated {args.images} JPEGs 500x375 in {time.time() - t:.0f} s")
        files = data.image_folder(root, vlm.image_size, check=False)
        load = loader_rate(files, args.batch, args.steps, workers)
        memory = data.Split(files.take(np.arange(min(len(files), args.batch * 4))),
                            files.labels[:min(len(files), args.batch * 4)])
        teachers = {}
        if args.method == "full":
            from infusing_kit.methods.teacher import extract_teacher
            t = time.perf_counter()
            teachers["files"] = extract_teacher(vlm, files, batch_size=max(256, args.batch), progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"teacher extraction (JPEG folder): {len(files) / (time.perf_counter() - t):8.1f} img/s")
            teachers["memory"] = extract_teacher(vlm, memory, progress=False)
        synthetic = train_rate(vlm, memory, args.batch, args.steps, args.device, args.method, teachers.get("memory"))
        fed = train_rate(vlm, files, args.batch, args.steps, args.device, args.method, teachers.get("files"))
        print(f"method {args.method}")
        print(f"loader alone:                  {load:8.1f} img/s")
        print(f"train step, synthetic tensors: {synthetic:8.1f} img/s")
        print(f"train step fed by the loader:  {fed:8.1f} img/s")
        print(f"ratio fed / synthetic: {fed / synthetic:.3f} (goal >= 0.9)")
        if args.rss:
            make_jpegs(Path(tmp) / "ten", 10_000 - args.images, seed=1, start=args.images)
            small = Path(tmp) / "small"
            for i, p in enumerate(sorted(root.rglob("*.jpg"))[:1000]):
                (small / p.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(p, small / p.parent.name / p.name)
            for p in root.rglob("*.jpg"):
                dst = Path(tmp) / "ten" / p.parent.name / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, dst)
            for folder in (small, Path(tmp) / "ten"):
                main_mb, workers_mb, n = peak_rss_embedding(folder, 112)
                print(f"peak RSS embedding {n:6d} images: main process {main_mb:7.1f} MB, largest worker {workers_mb:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
