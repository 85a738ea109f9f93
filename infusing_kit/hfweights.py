"""Hugging Face `transformers` CLIP and SigLIP checkpoints as `pretrained`, converted to open_clip's names (no
`transformers` needed): a folder (config.json + model.safetensors or pytorch_model.bin, or their sharded
`*.index.json`) or one `.safetensors` / `.bin` file whose keys are transformers' (`vision_model.`, `text_model.`).

- `source(pretrained)`: the checkpoint's weight files and config.json, or None when `pretrained` is not one.
- `load_hf(vlm, name, path, ...)`: the open_clip model `name` (built by `models.load_model`), every tensor of it filled from the file.
  A transformers CLIP (`CLIPModel`, `CLIPVisionModelWithProjection`) loads into an open_clip CLIP ViT
  (`VisionTransformer`: ViT-B-32, ViT-L-14-quickgelu, ...), a SigLIP (`SiglipModel`, `SiglipVisionModel`) into an
  open_clip SigLIP model (timm ViT trunk with attention pool: ViT-B-16-SigLIP, ...). Without `text_model.` keys (a
  vision-only file) the text tower stays random (seeded) and a warning says so; with them the text tower, the logit
  scale and the logit bias are the file's (the kit needs them for zero-shot prompts, LwF, EWC and image-text tests).

Refused, file and keys named: a key the model needs that the file lacks, a key of the file the model has no place
for (the first of each listed; `*.position_ids` buffers are ignored), a tensor of another shape, non-finite values,
a CLIP file for a SigLIP model or the reverse, and (with config.json) another number of attention heads or another
activation (OpenAI's CLIP weights use `quick_gelu`: load them as open_clip's `-quickgelu` model; SigLIP's tanh GELU
runs as open_clip's exact GELU, as open_clip's own SigLIP weights do). Not checked: that the
tokenizer's vocabulary is the model's (open_clip's tokenizer of `name` is used; only the vocabulary size is checked)
and layer-norm epsilons. Normalisation: the folder's preprocessor_config.json (`image_mean`, `image_std`), else
CLIP's (OpenAI) or SigLIP's (0.5) defaults. The position embedding is resized when `image_size` differs.

The mapping (open_clip <- transformers; blocks: `{i}` the layer index, q/k/v concatenated along the first dim):
  CLIP ViT  visual.conv1.weight                   <- vision_model.embeddings.patch_embedding.weight
            visual.class_embedding / .positional_embedding <- vision_model.embeddings.class_embedding /
                                                     .position_embedding.weight
            visual.ln_pre.* / visual.ln_post.*   <- vision_model.pre_layrnorm.* / vision_model.post_layernorm.*
            visual.proj                          <- visual_projection.weight, transposed
            visual.transformer.resblocks.{i}.ln_1 / ln_2 / attn.in_proj_* / attn.out_proj / mlp.c_fc / mlp.c_proj
                 <- vision_model.encoder.layers.{i}.layer_norm1 / layer_norm2 / self_attn.{q,k,v}_proj /
                    self_attn.out_proj / mlp.fc1 / mlp.fc2
  SigLIP    visual.trunk.patch_embed.proj.*      <- vision_model.embeddings.patch_embedding.* (conv with bias)
            visual.trunk.pos_embed               <- vision_model.embeddings.position_embedding.weight (no class token)
            visual.trunk.blocks.{i}.norm1 / norm2 / attn.qkv / attn.proj / mlp.fc1 / mlp.fc2  <- as above
            visual.trunk.norm.*                  <- vision_model.post_layernorm.* (no pre-layernorm)
            visual.trunk.attn_pool.latent / q / kv / proj / norm / mlp.*  <- vision_model.head.probe /
                 attention.in_proj_* (first third / last two thirds) / attention.out_proj / layernorm / mlp.*
  text      [text.]token_embedding.weight, [text.]positional_embedding <- text_model.embeddings.token_embedding.weight,
                 .position_embedding.weight; [text.]transformer.resblocks.{i}.* <- text_model.encoder.layers.{i}.*;
            [text.]ln_final.* <- text_model.final_layer_norm.*; text_projection <- text_projection.weight (CLIP,
                 transposed when open_clip holds a matrix) or text_model.head.* (SigLIP); logit_scale, logit_bias.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
IGNORED = re.compile(r".*\.position_ids")
FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
MEAN_STD = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
            "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
DEFAULTS = {"clip": {"vision": (12, "quick_gelu"), "text": (8, "quick_gelu")},  # transformers' config defaults
            "siglip": {"vision": (12, "gelu_pytorch_tanh"), "text": (12, "gelu_pytorch_tanh")}}
TOWERS = {"open_clip-vit": "clip", "timm-vit": "siglip"}


# ---------------------------------------------------------------------------- the files
def source(pretrained) -> tuple[list[Path], Path | None] | None:
    """(weight files, config.json or None) of a transformers checkpoint; None when `pretrained` is not one."""
    if pretrained is None:
        return None
    path = Path(str(pretrained))
    if path.is_dir():
        for index in INDEXES:
            if (path / index).is_file():
                shards = json.loads((path / index).read_text())["weight_map"].values()
                return [path / s for s in dict.fromkeys(shards)], _config(path)
        found = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if found is None and not (_config(path) or "/" in str(pretrained) or "\\" in str(pretrained)):
            return None  # a bare word that happens to name a folder here: an open_clip tag
        if found is None:
            raise FileNotFoundError(f"{path} is a folder without a transformers checkpoint (config.json and "
                                    f"{' or '.join(WEIGHTS)}); give the folder of one, or a weight file")
        return [found], _config(path)
    if path.is_file() and path.suffix in (".safetensors", ".bin") and _is_hf(path):
        return [path], _config(path.parent)
    return None


def _config(folder: Path) -> Path | None:
    return folder / "config.json" if (folder / "config.json").is_file() else None


def _keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format tensor file: open_clip's loader names what it is
        return []
    return list(state) if isinstance(state, dict) else []


def _is_hf(path: Path) -> bool:
    try:
        return any(k.startswith(("vision_model.", "text_model.")) for k in _keys(path))
    except Exception:  # an unreadable file: leave it to open_clip's loader, which names it
        return False


def read_state(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: a shard named by the checkpoint's index is missing")
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"{f} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); it may be "
                             "truncated: download or copy it again") from None
    return state


# ---------------------------------------------------------------------------- the mapping
def _block(oc: str, hf: str, timm: bool) -> list[tuple]:
    """A transformer block's rules: open_clip (or timm) names under `oc{i}.` <- transformers' under `hf{i}.`."""
    n1, qkv, out, n2, fc1, fc2 = (("norm1", "attn.qkv.", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") if timm else
                                  ("ln_1", "attn.in_proj_", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"))
    pairs = ((n1, "layer_norm1"), (out, "self_attn.out_proj"), (n2, "layer_norm2"), (fc1, "mlp.fc1"), (fc2, "mlp.fc2"))
    rules = [(oc + r"(\d+)\." + re.escape(a) + r"\.(weight|bias)", (hf + rf"\1.{b}.\2",), "copy") for a, b in pairs]
    rules.append((oc + r"(\d+)\." + re.escape(qkv) + r"(weight|bias)",
                  tuple(hf + rf"\1.self_attn.{p}_proj.\2" for p in "qkv"), "cat"))
    return rules


def rules(family: str, text_prefix: str, text_matrix: bool) -> tuple[list[tuple], list[tuple]]:
    """(image tower rules, text side rules): (open_clip key regex, transformers key templates, how)."""
    e, v = "vision_model.embeddings.", "vision_model."
    if family == "clip":
        image = [(r"visual\.conv1\.weight", (e + "patch_embedding.weight",), "copy"),
                 (r"visual\.class_embedding", (e + "class_embedding",), "copy"),
                 (r"visual\.positional_embedding", (e + "position_embedding.weight",), "copy"),
                 (r"visual\.ln_pre\.(weight|bias)", (v + r"pre_layrnorm.\1",), "copy"),
                 *_block(r"visual\.transformer\.resblocks\.", v + "encoder.layers.", False),
                 (r"visual\.ln_post\.(weight|bias)", (v + r"post_layernorm.\1",), "copy"),
                 (r"visual\.proj", ("visual_projection.weight",), "T")]
    else:
        t, h = r"visual\.trunk\.", v + "head."
        image = [(t + r"patch_embed\.proj\.(weight|bias)", (e + r"patch_embedding.\1",), "copy"),
                 (t + r"pos_embed", (e + "position_embedding.weight",), "copy"),
                 *_block(t + r"blocks\.", v + "encoder.layers.", True),
                 (t + r"norm\.(weight|bias)", (v + r"post_layernorm.\1",), "copy"),
                 (t + r"attn_pool\.latent", (h + "probe",), "copy"),
                 (t + r"attn_pool\.q\.(weight|bias)", (h + r"attention.in_proj_\1",), "q"),
                 (t + r"attn_pool\.kv\.(weight|bias)", (h + r"attention.in_proj_\1",), "kv"),
                 (t + r"attn_pool\.proj\.(weight|bias)", (h + r"attention.out_proj.\1",), "copy"),
                 (t + r"attn_pool\.norm\.(weight|bias)", (h + r"layernorm.\1",), "copy"),
                 (t + r"attn_pool\.mlp\.(fc1|fc2)\.(weight|bias)", (h + r"mlp.\1.\2",), "copy")]
    p, te = re.escape(text_prefix), "text_model.embeddings."
    projection = ((p + r"text_projection", ("text_projection.weight",), "T" if text_matrix else "copy"),
                  (p + r"text_projection\.weight", ("text_projection.weight",), "copy")) if family == "clip" else \
        ((p + r"text_projection\.(weight|bias)", (r"text_model.head.\1",), "copy"),)
    text = [(p + r"token_embedding\.weight", (te + "token_embedding.weight",), "copy"),
            (p + r"positional_embedding", (te + "position_embedding.weight",), "copy"),
            *_block(p + r"transformer\.resblocks\.", "text_model.encoder.layers.", False),
            (p + r"ln_final\.(weight|bias)", (r"text_model.final_layer_norm.\1",), "copy"), *projection,
            (r"logit_scale", ("logit_scale",), "copy"), (r"logit_bias", ("logit_bias",), "copy")]
    return image, text


def plan(targets, family: str, text_prefix: str, text_matrix: bool, with_text: bool, name: str) -> dict:
    """open_clip key -> (transformers keys, how), for every key of the image tower (and the text side)."""
    image, text = rules(family, text_prefix, text_matrix)
    out = {}
    for key in targets:
        table = image if key.startswith("visual.") else text
        if table is text and not with_text:
            continue
        for rx, templates, how in table:
            if m := re.fullmatch(rx, key):
                out[key] = (tuple(m.expand(t) for t in templates), how)
                break
        else:
            raise ValueError(f"{name!r} has {key}, which transformers' {family} layout has no counterpart for: "
                             f"give the open_clip model of the checkpoint's architecture")
    return out


def _apply(how: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if how == "cat":
        return torch.cat(tensors)
    x = tensors[0]
    if how == "T":
        return x.T
    if how in ("q", "kv"):  # an nn.MultiheadAttention's fused q,k,v rows: q is the first third
        third = x.shape[0] // 3
        return x[:third] if how == "q" else x[third:]
    return x


def _fits(x: torch.Tensor, shape: torch.Size) -> bool:
    return [d for d in x.shape if d != 1] == [d for d in shape if d != 1]


# ---------------------------------------------------------------------------- the model
def _heads_and_act(module) -> tuple[int, bool]:
    from open_clip.transformer import QuickGELU
    heads = next(m.num_heads for m in module.modules() if hasattr(m, "num_heads"))
    return heads, any(isinstance(m, QuickGELU) for m in module.modules())


def check_config(config: dict, family: str, model, name: str, path, with_text: bool) -> None:
    import open_clip
    text = model.text if hasattr(model, "text") else model.transformer
    towers = [("vision", model.visual)] + ([("text", text)] if with_text else [])
    for part, module in towers:
        sub = config.get(f"{part}_config") or config.get(f"{part}_config_dict") or \
            (config if config.get("model_type", "").endswith(f"_{part}_model") else {})
        default_heads, default_act = DEFAULTS[family][part]  # (save_pretrained leaves default values out)
        heads, act = sub.get("num_attention_heads", default_heads), sub.get("hidden_act", default_act)
        got_heads, quick = _heads_and_act(module)
        if heads != got_heads:
            raise ValueError(f"{path}: its {part} tower has {heads} attention heads, {name!r}'s has {got_heads}: give "
                             "the open_clip model name of the checkpoint's architecture")
        if (act == "quick_gelu") != quick:
            other = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else f"{name}-quickgelu"
            hint = f"load it as {other!r}" if other in open_clip.list_models() else "use a model with that activation"
            raise ValueError(f"{path}: its {part} tower uses {act}, {name!r}'s uses {'QuickGELU' if quick else 'GELU'}"
                             f" (OpenAI's CLIP weights use quick_gelu): {hint}")


def convert(model, state: dict, config: dict | None, path, name: str) -> tuple[dict, bool, str]:
    """The open_clip state dict of the file's tensors, whether it holds the text side, and its family."""
    from .towers import layout
    kind = layout(model.visual).kind
    family = TOWERS.get(kind)
    if family is None:
        raise ValueError(f"{path} is a transformers ViT checkpoint; {name!r} has a {kind} image tower: give an "
                         "open_clip CLIP ViT (e.g. ViT-B-32-quickgelu) or SigLIP model (e.g. ViT-B-16-SigLIP)")
    mine = ("siglip" if "vision_model.head.probe" in state or "logit_bias" in state else
            "clip" if "vision_model.embeddings.class_embedding" in state else family)
    if config is not None:
        mtype = config.get("model_type", "")
        if mtype not in FAMILIES:
            raise ValueError(f"{path}: config.json has model_type {mtype!r}; the kit converts transformers' "
                             f"{sorted(FAMILIES)} checkpoints")
        mine = FAMILIES[mtype]
    if mine != family:
        want = "CLIP ViT (e.g. ViT-B-32-quickgelu)" if mine == "clip" else "SigLIP model (e.g. ViT-B-16-SigLIP)"
        raise ValueError(f"{path} is a transformers {mine.upper() if mine == 'clip' else 'SigLIP'} checkpoint and "
                         f"{name!r} has a {kind} image tower: load it into an open_clip {want}")
    with_text = any(k.startswith("text_model.") for k in state)
    if config is not None:
        check_config(config, family, model, name, path, with_text)
    targets = model.state_dict()
    prefix = "text." if any(k.startswith("text.") for k in targets) else ""
    text_matrix = targets.get(prefix + "text_projection", torch.zeros(0)).ndim == 2
    steps = plan(targets, family, prefix, text_matrix, with_text, name)
    needed = {k for hf, _ in steps.values() for k in hf}
    missing = sorted(needed - set(state))
    unexpected = sorted(k for k in set(state) - needed if not IGNORED.fullmatch(k))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {name!r} as a transformers {family} checkpoint: "
                         f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) "
                         f"{unexpected[:3]}; it is another model's (deeper, wider, other heads): give the open_clip "
                         "model name that matches it")
    out = {}
    for key, (hf, how) in steps.items():
        x = _apply(how, [state[k] for k in hf])
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{path}: {hf[0]} holds NaN or infinite values; the checkpoint is damaged")
        want = targets[key].shape
        if x.shape != want and not _fits(x, want) and key in ("visual.positional_embedding", "visual.trunk.pos_embed"):
            x = _resize(model, key, x)
        if x.shape != want and not _fits(x, want):
            raise ValueError(f"{path}: {' + '.join(hf)} gives shape {tuple(x.shape)} for {key}, {name!r} needs "
                             f"{tuple(want)}: it is another model's checkpoint")
        out[key] = x.reshape(want).to(targets[key].dtype)
    return out, with_text, family


def _resize(model, key: str, x: torch.Tensor) -> torch.Tensor:
    """The position embedding at the model's grid (an `image_size` other than the checkpoint's)."""
    if key == "visual.positional_embedding":
        from open_clip.model import resize_pos_embed
        sd = {key: x}
        resize_pos_embed(sd, model)
        return sd[key]
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(x.reshape(1, -1, x.shape[-1]), new_size=model.visual.trunk.patch_embed.grid_size,
                                  num_prefix_tokens=0)


def load_hf(vlm, name: str, path, files: list[Path], config_path: Path | None):
    """Load a transformers checkpoint into `vlm` (`models.load_model` made it, randomly initialised, and moves and
    freezes it after; see the module docstring)."""
    config = json.loads(config_path.read_text()) if config_path is not None else None
    state = read_state(files)
    converted, with_text, family = convert(vlm.model, state, config, path, name)
    result = vlm.model.load_state_dict(converted, strict=False)
    left = [k for k in result.missing_keys if k.startswith("visual.") or with_text]
    if left or result.unexpected_keys:  # (the plan covers every key: this would be a bug here)
        raise RuntimeError(f"{path}: keys not loaded into {name!r}: {left[:3]} {result.unexpected_keys[:3]}")
    if not with_text:
        vlm.random_text = True  # seeded from the config: save_finetuned keeps it
        warnings.warn(f"{path}: the image tower is the checkpoint's; it has no text tower (text_model.*), so the text "
                      f"tower of {name} is random (use precomputed text embeddings for image-text retrieval)",
                      stacklevel=3)
    mean, std = MEAN_STD[family]
    pre = (config_path.parent / "preprocessor_config.json") if config_path is not None else None
    if pre is not None and pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    vlm.mean, vlm.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    vlm.visual.preprocess_cfg = {**vlm.visual.preprocess_cfg, "mean": vlm.mean, "std": vlm.std}
    vlm.pretrained = str(path)
    return vlm
