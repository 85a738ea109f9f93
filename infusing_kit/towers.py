"""One surface for every image tower the kit fine-tunes (after timm's `group_matcher` and `forward_intermediates`):
which parameters are the stem, which belong to block i, which come after the blocks (the head), the blocks as
modules (forward hooks give each block's features), the weights LoRA adapts, and how fused projections split.

Freezing (stem + first blocks), LoRA, L2-SP's fused-tensor split, drift/CKA, LDIFS and LiNeS all read it. Known:
- open_clip `VisionTransformer` (CLIP ViTs, the kit's toy models): conv1 / class and position embeddings /
  ln_pre, `transformer.resblocks.{i}`, fused `attn.in_proj_weight`;
- open_clip `TimmModel` around a timm `VisionTransformer` (SigLIP's `ViT-B-16-SigLIP`, ...): `trunk.patch_embed`
  / `trunk.pos_embed` / tokens, `trunk.blocks.{i}`, fused `attn.qkv`, attention pool `trunk.attn_pool` (fused kv);
- open_clip `TimmModel` around a timm `ConvNeXt` (open_clip's `convnext_*`): `trunk.stem`,
  `trunk.stages.{s}.blocks.{b}` numbered as one sequence of blocks (a stage's downsampling belongs to its first
  block), LoRA on the blocks' MLP linears (`mlp.fc1`, `mlp.fc2`); the depthwise convolutions are not adapted;
- open_clip `ModifiedResNet` (RN50, RN101, ...): conv1-3 / bn1-3 as the stem, `layer{k}.{b}` bottlenecks as one
  sequence of blocks, the attention pool after them. Its blocks are convolutions: LoRA (linear weights) is refused.
A block's features come back as tokens (B, tokens, width): a convolution's map (B, C, H, W) as its H x W positions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    kind: str
    stem: tuple[str, ...]              # parameter-name prefixes before the first block
    n_blocks: int
    lora_targets: tuple[str, ...]      # weight-name suffixes LoRA adapts (linear weights only)
    block_index: Callable              # parameter name -> its block (0-based) or None
    modules: Callable                  # tower -> its blocks as modules, in depth order
    batch_first: bool = True           # whether the blocks' outputs are (B, L, D) (else (L, B, D))
    no_lora: str = ""                  # why LoRA does not apply to this tower (empty: it does)

    def block_of(self, name: str) -> int | None:
        """The block a parameter belongs to (None: stem or after the blocks)."""
        return self.block_index(name)

    def blocks(self, tower: nn.Module) -> list[nn.Module]:
        return self.modules(tower)

    def frozen_by(self, name: str, n_blocks: int) -> bool:
        """Whether freezing the stem and the first n_blocks blocks freezes this parameter."""
        block = self.block_of(name)
        return name.startswith(self.stem) or (block is not None and block < n_blocks)

    def tokens(self, output, batch: int) -> torch.Tensor:
        """A block's output as (B, tokens, width), whatever its layout."""
        out = output[0] if isinstance(output, tuple) else output
        if out.ndim == 4:  # a convolution's map (B, C, H, W)
            return out.flatten(2).transpose(1, 2)
        return out if self.batch_first else out.transpose(0, 1)


def _prefix_index(prefix: str) -> Callable:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return lambda name: int(m.group(1)) if (m := pattern.match(name)) else None


def _sequence_index(pattern: str, counts: list[int], first_of: str | None = None) -> Callable:
    """Blocks numbered across stages: pattern matches (stage, block) in a name; `first_of`: a name part that belongs
    to the first block of its stage (a stage's downsampling)."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rx = re.compile(pattern)
    rx_first = re.compile(first_of) if first_of else None

    def index(name: str) -> int | None:
        m = rx.match(name)
        if m:
            return starts[int(m.group(1)) - (1 if "layer" in pattern else 0)] + int(m.group(2))
        m = rx_first.match(name) if rx_first else None
        return starts[int(m.group(1))] if m else None
    return index


def _open_clip_vit(tower):
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        return None
    return Layout("open_clip-vit", ("conv1.", "class_embedding", "positional_embedding", "ln_pre."), len(blocks),
                  ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
                  _prefix_index("transformer.resblocks."), lambda t: list(t.transformer.resblocks),
                  batch_first=getattr(tower.transformer, "batch_first", True))


def _timm_vit(tower):
    trunk = getattr(tower, "trunk", None)
    if trunk is None or not (hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed")):
        return None
    return Layout("timm-vit", ("trunk.patch_embed.", "trunk.pos_embed", "trunk.cls_token", "trunk.reg_token"),
                  len(trunk.blocks), ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                                      "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight"),
                  _prefix_index("trunk.blocks."), lambda t: list(t.trunk.blocks))


def _timm_convnext(tower):
    trunk = getattr(tower, "trunk", None)
    if trunk is None or not (hasattr(trunk, "stages") and hasattr(trunk, "stem")):
        return None
    counts = [len(s.blocks) for s in trunk.stages]
    return Layout("timm-convnext", ("trunk.stem.",), sum(counts), ("mlp.fc1.weight", "mlp.fc2.weight"),
                  _sequence_index(r"trunk\.stages\.(\d+)\.blocks\.(\d+)\.", counts,
                                  r"trunk\.stages\.(\d+)\.downsample\."),
                  lambda t: [b for s in t.trunk.stages for b in s.blocks])


def _open_clip_resnet(tower):
    if not (all(hasattr(tower, f"layer{i}") for i in range(1, 5)) and hasattr(tower, "attnpool")):
        return None
    counts = [len(getattr(tower, f"layer{i}")) for i in range(1, 5)]
    return Layout("open_clip-resnet", ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3."), sum(counts), (),
                  _sequence_index(r"layer(\d)\.(\d+)\.", counts),
                  lambda t: [b for i in range(1, 5) for b in getattr(t, f"layer{i}")],
                  no_lora="ModifiedResNet's blocks are convolutions and LoRA here adapts linear weights; use "
                          "another method (freezing, L2-SP, ...) or a ViT tower")


# The tower kinds the kit knows, one row each: a function tower -> its Layout, or None when the tower is not of
# that kind. The first row that recognises a tower gives its layout. A new kind of tower is one row here.
KINDS = [_open_clip_vit, _timm_vit, _timm_convnext, _open_clip_resnet]


def layout(tower: nn.Module) -> Layout:
    """The layout of an image tower (the first row of KINDS that recognises it); a clear error for towers the kit
    does not know."""
    for kind in KINDS:
        found = kind(tower)
        if found is not None:
            return found
    raise ValueError(f"the kit does not know the parts of a {type(tower).__name__} image tower (freezing, LoRA, drift "
                     "need them): it knows open_clip's VisionTransformer and ModifiedResNet, and timm ViT and ConvNeXt "
                     "towers (TimmModel); a new kind is one row of towers.KINDS")


def fused_parts(name: str) -> int:
    """How many tensors a fused parameter holds along its first dimension: 3 for q/k/v (open_clip's
    in_proj, timm's qkv), 2 for an attention pool's k/v, else 1."""
    if name.endswith(("in_proj_weight", "in_proj_bias")) or ".qkv." in name:
        return 3
    if ".kv." in name:
        return 2
    return 1
