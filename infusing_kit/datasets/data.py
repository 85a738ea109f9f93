"""Data: labelled image sets in memory or on disk and the dataset formats of real runs.

Two kinds of split, one interface (`len`, `.labels`, `.take(idx)` -> uint8 (B, 3, S, S), `.fingerprint()`):
- `Split`: images held as one uint8 tensor (the built-in world; small image folders).
- `FileSplit`: image files decoded on demand (`torchvision.io`, EXIF orientation applied; grayscale,
  palette, RGBA and CMYK become RGB), resized on the shorter side and centre-cropped to `size`. Training and
  evaluation read them through `DataLoader` workers (`sampling.batches`, `sampling.chunks`), so memory does not grow with the
  dataset.

Readers of the real formats (each returns a FileSplit, or captions for image-text sets):
- `image_folder(root, size)`: root/<class>/<image> (hidden folders and files ignored);
- `split_file(path, size, root)`: the official UnED split files, a JSON list of {"path", "class_id"};
- `csv_split(path, size, root)`: a CSV with columns path,label;
- `generic_folder(root, size, seed)`: an image folder split 80/20 (seeded, per class) into train and val,
  like the paper's ImageNet split;
- `caption_csv(path, size, root)` (columns image,caption) and `karpathy_json(path, size, root, split)`
  (Flickr30k / COCO, several captions per image): image-text test sets.
`load_image_folder` decodes a folder into memory (a `Split`), reporting every unreadable file at once.

Which batches training draws from these splits is `sampling`'s (the samplers of the paper's data mixing).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


@dataclass
class Split:
    """Images (uint8, N x 3 x S x S) with integer labels; optional captions and the image each describes."""
    images: torch.Tensor
    labels: np.ndarray
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray | None = None  # caption j describes image caption_image[j]
    class_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # unreadable files left out (load_image_folder)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"Split.images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> torch.Tensor:
        return self.images[torch.as_tensor(idx, dtype=torch.long)]

    def rows(self, start: int, stop: int) -> "Split":
        """Items start..stop-1 (a chunk of an extraction)."""
        return Split(self.images[start:stop], self.labels[start:stop])

    def fingerprint(self) -> str:
        """sha256 of the images, labels and captions (16 hex digits): what a checkpoint or teacher belongs to."""
        h = hashlib.sha256(f"{tuple(self.images.shape)}".encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()[:16]


@dataclass
class FileSplit:
    """Image files with integer labels, decoded on demand to uint8 (3, size, size). Same interface as Split."""
    paths: list[str]
    labels: np.ndarray
    size: int
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # unreadable files left out (skip_unreadable=True)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != len(self.labels):
            raise ValueError(f"FileSplit has {len(self.paths)} files but {len(self.labels)} labels")
        if self.size < 1:
            raise ValueError(f"FileSplit.size must be >= 1 pixel, got {self.size}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> torch.Tensor:
        return torch.stack([read_image(self.paths[int(i)], self.size) for i in np.asarray(idx).reshape(-1)])

    def rows(self, start: int, stop: int) -> "FileSplit":
        """Items start..stop-1 (a chunk of an extraction)."""
        return FileSplit(self.paths[start:stop], self.labels[start:stop], self.size)

    def fingerprint(self) -> str:
        """sha256 of the file list (names, sizes, modification times), labels, captions and output size."""
        h = hashlib.sha256(f"{self.size}|{len(self.paths)}".encode())
        h.update(file_stamps(self.paths))
        h.update(self.labels.tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()[:16]


AnySplit = Split | FileSplit


def file_stamps(paths: list[str]) -> bytes:
    """Each file's name, size and modification time, a line each: what the fingerprint of files on disk hashes."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append(f"{p}|{st.st_size}|{st.st_mtime_ns}\n")
    return "".join(out).encode()


# ---------------------------------------------------------------------------- decoding
def read_image(path: str | Path | bytes, size: int, name: str | None = None) -> torch.Tensor:
    """Decode one image file (or its bytes, e.g. a record's; `name` says which in errors) to RGB uint8
    (3, size, size): EXIF orientation applied, shorter side resized to `size` (antialiased), centre crop.
    torchvision.io decodes JPEG/PNG/WebP/GIF; other formats go through PIL."""
    from torchvision.transforms.v2 import functional as TF
    img = TF.resize(decode_rgb(path, name), size, antialias=True)
    return TF.center_crop(img, [size, size])


def decode_rgb(path: str | Path | bytes, name: str | None = None) -> torch.Tensor:
    """One image file (or its bytes) at full size as RGB uint8 (3, H, W), EXIF orientation applied: the pixels
    `read_image` resizes, and what the leakage check hashes (the same picture in another encoding is the same)."""
    encoded = isinstance(path, (bytes, bytearray))
    try:
        from torchvision.io import ImageReadMode, decode_image
        source = torch.frombuffer(bytearray(path), dtype=torch.uint8) if encoded else str(path)
        img = decode_image(source, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError, TypeError):
        import io
        img = _read_with_pil(io.BytesIO(bytes(path)) if encoded else path, name)
    if img.ndim == 4:  # an animated GIF: its first frame
        img = img[0]
    return to_uint8(img)


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Deep images (16-bit PNG, 32-bit TIFF) at their real range: the full range of their type onto 0..255."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype.is_floating_point:
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)
    top = float(torch.iinfo(img.dtype).max) if img.dtype != torch.int32 else 65535.0
    return (img.double() * (255.0 / top)).round().clamp(0, 255).to(torch.uint8)


def _read_with_pil(path, name: str | None = None) -> torch.Tensor:
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits, then RGB
                a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
                im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8)).convert("RGB")
            im = im.convert("RGB")
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {name or path}: {e}") from None


def check_files(paths: list[str]) -> list[str]:
    """Files that cannot be decoded as images, every bad one at once. Each file is decoded whole (a header check
    passed a truncated JPEG that then crashed a DataLoader worker); JPEGs decode at 1/8 scale (PIL's draft mode
    reads the whole stream, so truncation still shows, at a fraction of the cost)."""
    from PIL import Image
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except Exception as e:  # PIL raises many kinds; each is the same verdict: unreadable
            bad.append(f"{p} ({type(e).__name__}: {e})")
    return bad


def _unreadable_error(bad: list[str], what: str) -> ValueError:
    shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    return ValueError(f"{len(bad)} unreadable image file(s) in {what}:\n  {shown}\n"
                      "Remove or replace them, or pass skip_unreadable=True to leave them out (counted in .skipped).")


def _finish(paths: list[str], labels: list[int], size: int, what: str, skip_unreadable: bool, check: bool,
            **extra) -> FileSplit:
    if not paths:
        raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} in {what}")
    bad = check_files(paths) if check else []
    if bad and not skip_unreadable:
        raise _unreadable_error(bad, what)
    bad_paths = {b.split(" (", 1)[0] for b in bad}
    keep = [i for i, p in enumerate(paths) if p not in bad_paths]
    return FileSplit([paths[i] for i in keep], np.array([labels[i] for i in keep]), size, skipped=sorted(bad_paths),
                     **extra)


def _is_visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; expected root/<class>/<image> files")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _is_visible(d))
    if not classes:
        raise ValueError(f"dataset folder {root} has no class sub-folders; expected root/<class>/<image> files")
    return classes


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------- formats
def image_folder(root: str | Path, size: int, max_per_class: int | None = None, skip_unreadable: bool = False,
                 check: bool = True) -> FileSplit:
    """root/<class_name>/<image file> (classes sorted by name, labels 0..C-1; hidden folders and files, such as
    .ipynb_checkpoints, ignored). check=True opens every file's header first and reports all bad files at once."""
    root = Path(root)
    classes = _class_folders(root)
    paths, labels = [], []
    for c, name in enumerate(classes):
        for p in _images_in(root / name)[:max_per_class]:
            paths.append(str(p))
            labels.append(c)
    return _finish(paths, labels, size, str(root), skip_unreadable, check, class_names=classes)


def split_file(path: str | Path, size: int, root: str | Path | None = None, skip_unreadable: bool = False,
               check: bool = True) -> FileSplit:
    """The official UnED split format: a JSON list of {"path": relative/or/absolute, "class_id": int}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        items = json.loads(path.read_text())
        paths = [str(Path(root or path.parent) / it["path"]) for it in items]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a split file (a JSON list of {{'path', 'class_id'}}): {e}") from None
    bad = [i for i, it in enumerate(items) if not isinstance(it.get("class_id"), int) or isinstance(it["class_id"], bool)
           or not isinstance(it["path"], str)]
    if bad:
        it = items[bad[0]]
        raise ValueError(f"{path}: entry {bad[0]} ({it}) needs a string path and an integer class_id (a JSON number, "
                         f"not {type(it.get('class_id')).__name__}); {len(bad)} entries are like that")
    labels = [it["class_id"] for it in items]
    _require_files(paths, path)
    return _finish(paths, labels, size, str(path), skip_unreadable, check)


def csv_split(path: str | Path, size: int, root: str | Path | None = None, skip_unreadable: bool = False,
              check: bool = True) -> FileSplit:
    """A CSV file with a header row and the columns path,label (label: an integer or a class name)."""
    path = Path(path)
    rows = _csv_rows(path, ("path", "label"))
    raw = [r["label"] for r in rows]
    if any(l is None or r.get("path") is None for l, r in zip(raw, rows)):
        row = next(i for i, (l, r) in enumerate(zip(raw, rows)) if l is None or r.get("path") is None)
        raise ValueError(f"{path}: row {row + 2} has fewer columns than the header (path,label)")
    if all(l.lstrip("-").isdigit() for l in raw):
        labels, names = [int(l) for l in raw], []
    else:
        names = sorted(set(raw))
        labels = [names.index(l) for l in raw]
    paths = [str(Path(root or path.parent) / r["path"]) for r in rows]
    _require_files(paths, path)
    return _finish(paths, labels, size, str(path), skip_unreadable, check, class_names=names)


def generic_folder(root: str | Path, size: int, seed: int = 0, val_fraction: float = 0.2,
                   max_per_class: int | None = None, skip_unreadable: bool = False,
                   check: bool = True) -> tuple[FileSplit, FileSplit]:
    """An image folder split into (train, val) images of the same classes, `val_fraction` of each class held out
    at random (seeded): the paper's 80/20 split of ImageNet-train (val selects checkpoints; the official
    validation set is a separate test folder)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    full = image_folder(root, size, max_per_class, skip_unreadable, check)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(full), dtype=bool)
    for c in np.unique(full.labels):
        members = np.flatnonzero(full.labels == c)
        n = int(round(val_fraction * len(members)))
        val[rng.choice(members, size=min(n, len(members) - 1), replace=False)] = True
    pick = lambda m: FileSplit([full.paths[i] for i in np.flatnonzero(m)], full.labels[m], size,
                               class_names=full.class_names, skipped=full.skipped)
    return pick(~val), pick(val)


def caption_csv(path: str | Path, size: int, root: str | Path | None = None) -> FileSplit:
    """An image-text test set as a CSV with columns image,caption (one row per caption; an image may have several)."""
    path = Path(path)
    rows = _csv_rows(path, ("image", "caption"))
    return _caption_split([(r["image"], r["caption"]) for r in rows], Path(root or path.parent), size, path)


def karpathy_json(path: str | Path, size: int, root: str | Path, split: str = "test") -> FileSplit:
    """Flickr30k / COCO in Karpathy's format: {"images": [{"filename", "filepath"?, "split", "sentences":
    [{"raw"}, ...]}, ...]}; the images of `split` with all their captions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    try:
        images = json.loads(path.read_text())["images"]
        pairs = [(str(Path(im.get("filepath", "")) / im["filename"]), s["raw"]) for im in images
                 if im.get("split") == split for s in im["sentences"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a Karpathy caption file ({{'images': [{{'filename', 'split', "
                         f"'sentences'}}]}}): {e}") from None
    if not pairs:
        raise ValueError(f"{path} has no images in split {split!r}")
    return _caption_split(pairs, Path(root), size, path)


def _caption_split(pairs: list[tuple[str, str]], root: Path, size: int, source: Path) -> FileSplit:
    empty = [i for i, (_, c) in enumerate(pairs) if not str(c).strip()]
    if empty:
        raise ValueError(f"{source}: {len(empty)} empty caption(s) (e.g. entries {empty[:5]}, counted from 0): an empty "
                         "caption would be scored as a caption; remove those rows")
    images = list(dict.fromkeys(p for p, _ in pairs))
    index = {p: i for i, p in enumerate(images)}
    paths = [str(root / p) for p in images]
    _require_files(paths, source)
    return FileSplit(paths, np.arange(len(images)), size, captions=[c for _, c in pairs],
                     caption_image=np.array([index[p] for p, _ in pairs]))


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _dict_rows(csv.DictReader(f), path, columns)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 (e.g. "
                         "iconv -f latin1 -t utf-8)") from None


def _dict_rows(reader, path: Path, columns: tuple[str, ...]) -> list[dict]:
    missing = set(columns) - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{path} needs a header row with the columns {','.join(columns)}; "
                         f"missing {sorted(missing)} (found {reader.fieldnames})")
    return list(reader)


def _require_files(paths: list[str], source: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) listed in {source} do not exist, e.g. {missing[:3]}; "
                                "check the root folder the paths are relative to")


def load_image_folder(root: str | Path, size: int, max_per_class: int | None = None,
                      skip_unreadable: bool = False) -> Split:
    """Read root/<class_name>/<image file> into memory (a Split; small datasets). Every unreadable file is
    reported at once; skip_unreadable=True leaves them out instead."""
    files = image_folder(root, size, max_per_class, check=False)
    images, keep, bad = [], [], []
    for i, p in enumerate(files.paths):
        try:
            images.append(read_image(p, size))
            keep.append(i)
        except ValueError as e:
            bad.append(str(e).removeprefix("cannot read image "))
    if bad and not skip_unreadable:
        raise _unreadable_error(bad, str(root))
    if not images:
        raise ValueError(f"no readable images under {root}")
    return Split(torch.stack(images), files.labels[keep], class_names=files.class_names,
                 skipped=[b.split(": ", 1)[0] for b in bad])
