"""Train-step throughput: the kit's train() vs a bare open_clip image-tower step (one run, printed ratio).

  python benchmarks/bench_train_step.py [--models toy-clip ViT-B-32@112] [--batch 64] [--steps 20]

bare: pre-normalised float batch -> model.visual -> cosine logits -> cross-entropy -> backward -> AdamW,
written directly in torch. kit: infusing_kit.train.train() on the same model, batch size and data
(uint8 images indexed, preprocessed, augmented=none, head + NormFace CE, logging), no validation.
ratio = kit img/s / bare img/s (goal >= 0.9). Steps after the first two are timed.

Then, per regularizer, the kit's mean step time relative to naive fine-tuning on the same model (goal for
the full combination with pre-extracted teacher embeddings: <= 1.10x). Round-robin runs alternate target
and generic batches; their mean step time covers both kinds. Last, the L2-SP gradient alone: a per-tensor loop,
torch._foreach kernels, and the kit's default (foreach on CUDA, the loop on the CPU, like torch.optim).
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from infusing_kit.datasets.data import Split
from infusing_kit.models import load_model, preprocess
from infusing_kit.train import TrainConfig, TrainState, train


COMPILE = False  # --compile: the image tower through torch.compile (bare and kit alike)


def make_vlm(spec, device):
    name, _, size = spec.partition("@")
    torch.manual_seed(0)
    vlm = load_model(name, pretrained=None, device=device, image_size=int(size) if size else None)
    if COMPILE:
        vlm.model.visual = torch.compile(vlm.model.visual)
    return vlm


def bare(vlm, images, labels, n_classes, batch, steps):
    visual = vlm.visual
    w = torch.nn.Parameter(torch.randn(n_classes, visual.output_dim, device=vlm.device) * 0.05)
    opt = torch.optim.AdamW(list(visual.parameters()) + [w], lr=1e-5)
    x = preprocess(vlm, images[:batch])
    y = torch.as_tensor(labels[:batch], device=vlm.device)
    visual.train()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
            emb = visual(x)
        loss = F.cross_entropy(16 * F.normalize(emb.float(), dim=1) @ F.normalize(w, dim=1).T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if vlm.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch / np.median(times[2:])


def kit(vlm, images, labels, batch, steps):
    times, last = [], [time.perf_counter()]

    def clock(state: TrainState):
        if vlm.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    cfg = TrainConfig(steps=steps, batch_size=batch, eval_every=0, ckpt_every=0, log_every=10**9)
    last[0] = time.perf_counter()
    train(vlm, Split(images, labels), cfg, out_dir=None, hooks=(clock,), progress=False)
    return batch / np.median(times[2:])


REGULARIZERS = {
    "naive": {},
    "l2sp (mean, foreach)": {"l2sp": 10.0},
    "ewc": {"ewc": 10.0},
    "distill, pre-extracted": {"distill": 1.0, "sampler": "round_robin"},
    "distill, live teacher": {"distill": 1.0, "sampler": "round_robin", "_live": True},
    "full (l2sp + distill)": {"l2sp": 10.0, "distill": 1.0, "sampler": "round_robin"},
    "lora (rank 4)": {"lora_rank": 4},
    # the newer methods (presets.PRESETS; their strengths do not change a step's cost)
    "l2 to zero": {"l2_zero": 0.1},
    "spd (step rule)": {"spd": 0.5},
    "tpgm (projection)": {"tpgm": 0.01},
    "sparse update": {"sparse": 0.01},
    "ema of weights": {"average": "ema", "average_tau": 2.0},
    "weight average (every step)": {"average": "uniform", "average_every": 1},
    "distill, cosine": {"distill": 1.0, "distill_kind": "cosine", "sampler": "round_robin"},
    "relational": {"relational": 1.0, "sampler": "round_robin"},
    "ldifs (every block)": {"ldifs": 1.0, "sampler": "round_robin"},
    "lwf (text tower)": {"lwf": 1.0, "sampler": "round_robin"},
    "lipsum (text tower)": {"lipsum": 1.0, "lipsum_texts": 4},
    "adaptive sampler": {"distill": 1.0, "sampler": "adaptive", "adaptive_every": 25},
    "tracer (bma teacher)": {"tracer": 1.0, "sampler": "round_robin"},
    "dive avl": {"avl": 1.0, "sampler": "round_robin"},
    "flow (weighted ce)": {"flow": 1.0},
}


def regularizer_times(spec, device, batch, steps):
    from dataclasses import replace
    from infusing_kit import world as W
    from infusing_kit.protocol.experiment import Domains, prepare_inputs
    out = {}
    for name, changes in REGULARIZERS.items():
        changes = dict(changes)
        live = changes.pop("_live", False)
        vlm = make_vlm(spec, device)
        n = batch * 4
        images = torch.randint(0, 256, (n, 3, vlm.image_size, vlm.image_size), dtype=torch.uint8)
        target, generic = Split(images, np.arange(n) % 50), Split(images.flip(0).contiguous(), np.arange(n) % 7)
        cfg = replace(TrainConfig(steps=steps, batch_size=batch, eval_every=0, ckpt_every=0, log_every=10**9), **changes)
        prompts = [W.caption(a) for a in W.combo_to_attributes(np.arange(7))]  # words every tokenizer here knows
        domains = Domains(target, target, target, generic, generic, generic, generic, prompts)
        extra = prepare_inputs(vlm, cfg, domains, fisher_images=8)  # the experiments' own input preparation
        if live:
            extra["teacher"] = "live"
        times, last = [], [0.0]

        def clock(state):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
        last[0] = time.perf_counter()
        train(vlm, target, cfg, generic=generic, hooks=(clock,), progress=False, **extra)
        out[name] = float(np.mean(times[4:]))
    return out


def penalty_times(spec, device, repeats=30):
    """The L2-SP gradient alone on every tower tensor: the kit's foreach version vs one small op per tensor."""
    from infusing_kit.methods.regularizers import Quadratic, quadratic_penalty_, quadratic_weights
    vlm = make_vlm(spec, device)
    named = dict(vlm.visual.named_parameters())
    params = list(named.values())
    for p in params:
        p.grad = torch.zeros_like(p)
    centres = [p.detach() + 0.01 for p in params]
    weights = quadratic_weights(named, "l2sp_mean")
    q = Quadratic.build(weights, 10.0, centres)

    @torch.no_grad()
    def per_tensor():  # gradient only, one subtraction and one fused add per tensor
        for p, c, w in zip(params, centres, weights):
            p.grad.add_(p - c, alpha=10.0 * w)

    out = {}
    for name, fn in (("per-tensor loop", per_tensor),
                     ("foreach", lambda: quadratic_penalty_(params, q, value=False, foreach=True)),
                     ("kit default", lambda: quadratic_penalty_(params, q, value=False)),
                     ("kit default + value", lambda: quadratic_penalty_(params, q))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[name] = float(np.median(times[3:]))
    return len(params), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["toy-clip", "ViT-B-32@112"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the image tower (bare and kit)")
    ap.add_argument("--skip-regularizers", action="store_true")
    args = ap.parse_args()
    global COMPILE
    COMPILE = args.compile
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch}, median of {args.steps - 2} "
          f"steps, torch.compile {'on' if args.compile else 'off'}")
    print(f"{'model':>16} {'bare img/s':>11} {'kit img/s':>10} {'kit/bare':>9}")
    for spec in args.models:
        vlm = make_vlm(spec, args.device)
        n = args.batch * 4
        images = torch.randint(0, 256, (n, 3, vlm.image_size, vlm.image_size), dtype=torch.uint8)
        labels = np.arange(n) % 50
        b = bare(vlm, images, labels, 50, args.batch, args.steps)
        vlm = make_vlm(spec, args.device)
        k = kit(vlm, images, labels, args.batch, args.steps)
        print(f"{spec:>16} {b:>11.1f} {k:>10.1f} {k / b:>9.3f}")
    for spec in [] if args.skip_regularizers else args.models:
        t = regularizer_times(spec, args.device, args.batch, args.steps)
        print(f"\n{spec}: mean step time per regularizer (x naive)")
        for name, v in t.items():
            print(f"  {name:>24} {1000 * v:8.1f} ms  {v / t['naive']:5.2f}x")
        n, pt = penalty_times(spec, args.device)
        print(f"  L2-SP gradient alone over {n} tensors (naive step {1000 * t['naive']:.1f} ms): "
              + ", ".join(f"{k} {1000 * v:.2f} ms ({v / pt['per-tensor loop']:.2f}x)" for k, v in pt.items()))


if __name__ == "__main__":
    main()
