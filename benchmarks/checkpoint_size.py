"""Size of a run's last.pt for ViT-B-32 (random weights, 32 px inputs, 2 steps with L2-SP): what resuming needs.

  python benchmarks/checkpoint_size.py
"""
import tempfile
from pathlib import Path

import torch

from infusing_kit.datasets.data import Split
from infusing_kit.models import load_model
from infusing_kit.train import TrainConfig, train


def main():
    torch.manual_seed(0)
    vlm = load_model("ViT-B-32", None, image_size=32)
    n = sum(p.numel() for p in vlm.visual.parameters())
    split = Split(torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 4)
    cfg = TrainConfig(steps=2, batch_size=8, ckpt_every=1, eval_every=100, l2sp=1.0, select="fine_map@20")
    with tempfile.TemporaryDirectory() as d:
        train(vlm, split, cfg, out_dir=d, progress=False)
        size = (Path(d) / "last.pt").stat().st_size
    print(f"ViT-B-32 image tower: {n/1e6:.1f} M parameters; last.pt {size/1e9:.3f} GB ({size / (4 * n):.2f} x the "
          f"float32 tower; with a copy of the pretrained weights it would be about {(size + 4*n)/1e9:.2f} GB)")


if __name__ == "__main__":
    main()
