"""What the kit needs to know about an image tower's parts, for open_clip's own ViT and for timm towers.

Block freezing names the stem and the first blocks; LoRA names the attention and MLP weights it adapts;
L2-SP's per-tensor mean splits fused projections into their parts (q/k/v as three tensors, as in the paper's
JAX model, and the attention pool's fused k/v as two). `layout(tower)` returns these for:

- open_clip `VisionTransformer` (CLIP ViTs, the kit's toy models): conv1 / class and position embeddings /
  ln_pre, `transformer.resblocks.{i}`, fused `attn.in_proj_weight`;
- open_clip `TimmModel` around a timm `VisionTransformer` (SigLIP's `ViT-B-16-SigLIP`, ...): `trunk.patch_embed`
  / `trunk.pos_embed` / tokens, `trunk.blocks.{i}`, fused `attn.qkv`, attention pool `trunk.attn_pool` with a
  fused `kv`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    kind: str
    stem: tuple[str, ...]            # parameter-name prefixes before the first block
    block_prefix: str                # block i's parameters start with block_prefix + f"{i}."
    n_blocks: int
    lora_targets: tuple[str, ...]    # weight-name suffixes LoRA adapts

    def block_of(self, name: str) -> int | None:
        """The block a parameter belongs to (None: stem or after the blocks)."""
        if not name.startswith(self.block_prefix):
            return None
        return int(name[len(self.block_prefix):].split(".", 1)[0])

    def blocks(self, tower: nn.Module) -> list[nn.Module]:
        """The tower's blocks as modules, in depth order (forward hooks on them give each block's features)."""
        return list(tower.transformer.resblocks if self.kind == "open_clip-vit" else tower.trunk.blocks)

    def frozen_by(self, name: str, n_blocks: int) -> bool:
        """Whether freezing the stem and the first n_blocks blocks freezes this parameter."""
        block = self.block_of(name)
        return name.startswith(self.stem) or (block is not None and block < n_blocks)


def layout(tower: nn.Module) -> Layout:
    """The layout of an image tower; a clear error for towers the kit does not know."""
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is not None:
        return Layout("open_clip-vit", ("conv1.", "class_embedding", "positional_embedding", "ln_pre."),
                      "transformer.resblocks.", len(blocks),
                      ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    trunk = getattr(tower, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        return Layout("timm-vit", ("trunk.patch_embed.", "trunk.pos_embed", "trunk.cls_token", "trunk.reg_token"),
                      "trunk.blocks.", len(trunk.blocks),
                      ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                       "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight"))
    raise ValueError(f"the kit does not know the parts of a {type(tower).__name__} image tower (block freezing and "
                     "LoRA need them): it knows open_clip's VisionTransformer and timm ViT towers (TimmModel)")


def fused_parts(name: str) -> int:
    """How many tensors a fused parameter holds along its first dimension: 3 for q/k/v (open_clip's
    in_proj, timm's qkv), 2 for an attention pool's k/v, else 1."""
    if name.endswith(("in_proj_weight", "in_proj_bias")) or ".qkv." in name:
        return 3
    if ".kv." in name:
        return 2
    return 1
