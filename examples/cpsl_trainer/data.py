"""Loaders for the datasets as they are laid out on disk (GTA5, Cityscapes, SYNTHIA-RAND-CITYSCAPES),
PNG writers in the same formats, and ``prepare``: a check of a dataset tree that says how to fix it.

Nothing is ever downloaded: the datasets need accounts and licences, so the user fetches them and the
messages here say where from and where to unzip them.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import png
import torch
from PIL import Image
from torch.utils.data import Dataset

from .files import read_with_path
from .labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_PALETTE,
    cityscapes_to_train_ids,
    restrict_classes,
    synthia_to_train_ids,
)

PathLike = Union[str, Path]
Size = Tuple[int, int]

# -- PNG files


def read_png16(path: PathLike) -> np.ndarray:
    """(H, W, C) uint16 pixels of a PNG at the file's own bit depth.

    Pillow reduces 16-bit RGB PNGs to 8 bits (SYNTHIA's class ids come out as zeros), pypng does not.
    """
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    pixels = np.array([np.asarray(row, dtype=np.uint16) for row in rows], dtype=np.uint16)
    return pixels.reshape(height, width, info["planes"])


def read_rgb(path: PathLike) -> Image.Image:
    """An image file as 8-bit RGB, decoded whole (the file is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _parent_made(path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _checked(array: np.ndarray, ndim: int, dtype: type, what: str) -> np.ndarray:
    if array.ndim != ndim or array.dtype != dtype or (ndim == 3 and array.shape[2] != 3):
        shape = "(H, W, 3)" if ndim == 3 else "(H, W)"
        raise ValueError(f"{what} must be a {shape} {np.dtype(dtype).name} array, got {array.shape} {array.dtype}")
    return np.ascontiguousarray(array)


def write_rgb(path: PathLike, image: np.ndarray) -> None:
    """Saves a (H, W, 3) uint8 image as an RGB PNG, creating the parent folders."""
    Image.fromarray(_checked(image, 3, np.uint8, "image")).save(_parent_made(path))


def write_gta5_label(path: PathLike, label_ids: np.ndarray) -> None:
    """Saves (H, W) uint8 Cityscapes label ids as GTA5 ships them: a palette PNG whose indices are the
    ids, coloured with the Cityscapes colours of the evaluated classes (black elsewhere)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        palette[label_id] = CITYSCAPES_PALETTE[train_id]
    image = Image.fromarray(_checked(label_ids, 2, np.uint8, "label ids"))
    image.putpalette(palette.flatten().tolist())
    image.save(_parent_made(path))


def write_cityscapes_label(path: PathLike, label_ids: np.ndarray) -> None:
    """Saves (H, W) uint8 Cityscapes label ids as an 8-bit grayscale PNG (``*_gtFine_labelIds.png``)."""
    Image.fromarray(_checked(label_ids, 2, np.uint8, "label ids")).save(_parent_made(path))


def write_synthia_label(path: PathLike, class_ids: np.ndarray, instance_ids: Optional[np.ndarray] = None) -> None:
    """Saves (H, W) uint16 SYNTHIA class ids as SYNTHIA's GT/LABELS: a 16-bit RGB PNG with the class in
    the first channel, the instance id (default 0) in the second and zeros in the third."""
    class_ids = _checked(class_ids, 2, np.uint16, "class ids")
    pixels = np.zeros(class_ids.shape + (3,), dtype=np.uint16)
    pixels[..., 0] = class_ids
    if instance_ids is not None:
        pixels[..., 1] = instance_ids
    height, width = class_ids.shape
    with open(_parent_made(path), "wb") as file:
        png.Writer(width, height, greyscale=False, bitdepth=16).write(file, pixels.reshape(height, width * 3))


# -- where each dataset keeps its files

GTA5_HINT = ("download the images and labels parts from https://download.visinf.tu-darmstadt.de/data/from_games/ "
             "and unzip them into {root}")
CITYSCAPES_IMAGES_HINT = ("download leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ "
                          "and unzip it into {root}")
CITYSCAPES_LABELS_HINT = ("download gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ "
                          "and unzip it into {root}")
SYNTHIA_HINT = ("download SYNTHIA-RAND-CITYSCAPES from https://synthia-dataset.net/downloads/ and unzip it so that "
                "{root} holds RGB/ and GT/LABELS/")
UNPAIRED_HINT = "re-extract the archive if it was interrupted, or delete the file (it is skipped meanwhile)"


@dataclass(frozen=True)
class Layout:
    """The files of one dataset split, relative to the dataset root. A file's pairing key is its path
    below its folder without the part its glob matches after the last ``*``."""

    dataset: str
    image_dir: str
    image_glob: str
    image_hint: str
    label_dir: Optional[str] = None  # None: images only (the unlabelled target train set)
    label_globs: Tuple[str, ...] = ()  # a key matched by several globs takes the last one's file
    label_hint: str = ""

    def expected(self, root: Path) -> str:
        """The folder patterns, for messages."""
        images = root / self.image_dir / self.image_glob
        if self.label_dir is None:
            return str(images)
        return f"{images} with {' or '.join(str(root / self.label_dir / g) for g in self.label_globs)}"

    def fix(self, root: Path) -> str:
        """How to obtain the whole split, for messages."""
        hints = dict.fromkeys([self.image_hint] + ([self.label_hint] if self.label_dir is not None else []))
        return "; ".join(hint.format(root=root) for hint in hints)


GTA5_LAYOUT = Layout("GTA5", "images", "*.png", GTA5_HINT, "labels", ("*.png",), GTA5_HINT)
SYNTHIA_LAYOUT = Layout("SYNTHIA", "RGB", "*.png", SYNTHIA_HINT, "GT/LABELS", ("*.png",), SYNTHIA_HINT)


def cityscapes_layout(split: str, with_labels: bool = True) -> Layout:
    """Later globs win: a ``labelTrainIds`` file is preferred to the ``labelIds`` one."""
    labels = dict(label_dir=f"gtFine/{split}", label_hint=CITYSCAPES_LABELS_HINT,
                  label_globs=("*/*_gtFine_labelIds.png", "*/*_gtFine_labelTrainIds.png"))
    return Layout("Cityscapes", f"leftImg8bit/{split}", "*/*_leftImg8bit.png", CITYSCAPES_IMAGES_HINT,
                  **(labels if with_labels else {}))


@dataclass
class Scan:
    """What a layout finds under a root: pairs (label None without labels), unpaired files and the
    missing folders as (pattern, how to fix)."""

    pairs: List[Tuple[Path, Optional[Path]]] = field(default_factory=list)
    unpaired: List[Path] = field(default_factory=list)
    missing_dirs: List[Tuple[str, str]] = field(default_factory=list)


def _keyed(folder: Path, pattern: str) -> Dict[str, Path]:
    suffix = pattern.rsplit("*", 1)[1]
    return {path.relative_to(folder).as_posix()[: -len(suffix)]: path for path in sorted(folder.glob(pattern))}


def scan(layout: Layout, root: PathLike) -> Scan:
    """Pairs images and labels by globbing (GTA5 announces 24,966 frames but ships 24,941 pairs)."""
    root = Path(root)
    result = Scan()
    folders = [(layout.image_dir, layout.image_glob, layout.image_hint)]
    if layout.label_dir is not None:
        folders.append((layout.label_dir, layout.label_globs[0], layout.label_hint))
    for folder, pattern, hint in folders:
        if not (root / folder).is_dir():
            result.missing_dirs.append((str(root / folder / pattern), hint.format(root=root)))
    if result.missing_dirs:
        return result
    images = _keyed(root / layout.image_dir, layout.image_glob)
    if layout.label_dir is None:
        result.pairs = [(images[key], None) for key in sorted(images)]
        return result
    labels: Dict[str, Path] = {}
    for pattern in layout.label_globs:
        labels.update(_keyed(root / layout.label_dir, pattern))
    result.pairs = [(images[key], labels[key]) for key in sorted(images.keys() & labels.keys())]
    result.unpaired = sorted([images[k] for k in images.keys() - labels.keys()]
                             + [labels[k] for k in labels.keys() - images.keys()])
    return result


# -- datasets


class SegmentationDataset(Dataset):
    """Image/label pairs of one dataset split; subclasses say where the files are and how to read a label.

    A sample is a dict: ``image`` uint8 (3, H, W), ``label`` uint8 (H, W) of train ids (renumbered to
    ``classes`` when given) or IGNORE_INDEX, ``has_label`` bool and ``name`` (the image path relative
    to the root). Without labels the label is an empty uint8 tensor and ``has_label`` False: a
    full-size dummy would cross the loader's shared memory for nothing (16.8 MB a 1024x2048 image
    in int64). Labels stay uint8 until used (``.long()``).
    """

    def __init__(self, root: PathLike, layout: Layout, size: Optional[Size] = None,
                 classes: Optional[Sequence[int]] = None) -> None:
        self.root = Path(root)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.classes = None if classes is None else list(classes)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{layout.dataset} root {self.root} does not exist; expected "
                                    f"{layout.expected(self.root)}: {layout.fix(self.root)}, "
                                    "or fix the path in the config")
        found = scan(layout, self.root)
        if found.missing_dirs:
            pattern, hint = found.missing_dirs[0]
            raise FileNotFoundError(f"{layout.dataset}: missing folder for {pattern}: {hint}")
        if not found.pairs:
            raise FileNotFoundError(f"{layout.dataset}: no {'pairs' if layout.label_dir else 'images'} found; "
                                    f"expected {layout.expected(self.root)}: {layout.fix(self.root)}")
        self.pairs = found.pairs
        self.missing = found.unpaired
        if self.missing:
            warnings.warn(f"{layout.dataset}: skipped {len(self.missing)} unpaired files under {self.root} "
                          f"(e.g. {self.missing[0]}); they are listed in dataset.missing", stacklevel=2)

    def __len__(self) -> int:
        return len(self.pairs)

    def read_train_ids(self, path: Path) -> np.ndarray:
        """(H, W) uint8 Cityscapes train ids / IGNORE_INDEX of one label file."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Dict[str, object]:
        image_path, label_path = self.pairs[index]
        image = read_with_path(image_path, read_rgb)
        label = None
        if label_path is not None:
            label = Image.fromarray(read_with_path(label_path, self.read_train_ids))
            if self.size is None and label.size != image.size:
                raise ValueError(f"{image_path} is {image.width}x{image.height} but its label {label_path} is "
                                 f"{label.width}x{label.height}; pass size=(H, W) to resize both")
        if self.size is not None:
            image = image.resize(self.size[::-1], Image.Resampling.BILINEAR)
            label = None if label is None else label.resize(self.size[::-1], Image.Resampling.NEAREST)
        train_ids = np.zeros(0, dtype=np.uint8) if label is None else np.array(label, dtype=np.uint8)
        if self.classes is not None:
            train_ids = restrict_classes(train_ids, self.classes)
        return {
            "image": torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(),
            "label": torch.from_numpy(train_ids),
            "has_label": label_path is not None,
            "name": image_path.relative_to(self.root).as_posix(),
        }


def read_label_ids(path: Path) -> np.ndarray:
    """(H, W) uint8 label ids of an 8-bit single-channel PNG, greyscale or palette (GTA5's: the
    palette indices are the ids, converting to RGB would give colours). Any other mode (RGB, 16
    bits) would be misread as ids: a ValueError naming the file."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{path}: expected an 8-bit single-channel label PNG (greyscale or palette), got "
                             f"PIL mode {image.mode}")
        return np.asarray(image)


class GTA5Dataset(SegmentationDataset):
    """GTA5: ``root/images/NNNNN.png`` with palette PNGs ``root/labels/NNNNN.png`` of Cityscapes ids."""

    def __init__(self, root: PathLike, size: Optional[Size] = None, classes: Optional[Sequence[int]] = None) -> None:
        super().__init__(root, GTA5_LAYOUT, size, classes)

    def read_train_ids(self, path: Path) -> np.ndarray:
        return cityscapes_to_train_ids(read_label_ids(path))


class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``root/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with
    ``root/gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png`` when present, else ``*_gtFine_labelIds.png``.
    ``with_labels=False`` (the target train set) needs no gtFine folder; see SegmentationDataset for the
    samples it returns."""

    def __init__(self, root: PathLike, split: str = "train", size: Optional[Size] = None,
                 classes: Optional[Sequence[int]] = None, with_labels: bool = True) -> None:
        super().__init__(root, cityscapes_layout(split, with_labels), size, classes)

    def read_train_ids(self, path: Path) -> np.ndarray:
        label = read_label_ids(path)
        return label if path.name.endswith("_labelTrainIds.png") else cityscapes_to_train_ids(label)


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/*.png`` with 16-bit ``root/GT/LABELS/*.png`` (class in the
    first channel)."""

    def __init__(self, root: PathLike, size: Optional[Size] = None, classes: Optional[Sequence[int]] = None) -> None:
        super().__init__(root, SYNTHIA_LAYOUT, size, classes)

    def read_train_ids(self, path: Path) -> np.ndarray:
        return synthia_to_train_ids(read_png16(path)[..., 0])


# -- checking a tree

# What ``prepare`` checks: (split name, layout); Cityscapes' train labels are not used for training.
CHECKED: Dict[str, List[Tuple[str, Layout]]] = {
    "gta5": [("", GTA5_LAYOUT)],
    "cityscapes": [("train", cityscapes_layout("train", with_labels=False)), ("val", cityscapes_layout("val"))],
    "synthia": [("", SYNTHIA_LAYOUT)],
}


@dataclass
class DatasetReport:
    """What ``check_dataset`` found: counts per split and problems, each saying how to fix it."""

    kind: str
    root: Path
    counts: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items()) or "nothing found"
        lines = [f"{self.kind} at {self.root}: {counts}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        return "\n".join(lines + [f"  - {problem}" for problem in self.problems])


def _size_problem(image_path: Path, label_path: Path) -> Optional[str]:
    try:
        with Image.open(image_path) as image, Image.open(label_path) as label:
            if image.size == label.size:
                return None
            return (f"size mismatch: {image_path} is {image.width}x{image.height} but {label_path} is "
                    f"{label.width}x{label.height}: re-extract both, or set a resize size in the config")
    except OSError as error:
        return f"unreadable file ({error}): re-extract it from the dataset archive or delete it"


def _decode_problem(path: Path) -> Optional[str]:
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except (OSError, SyntaxError, ValueError) as error:
        return f"undecodable file {path} ({error}): re-extract it from the dataset archive or delete it"


def check_dataset(kind: str, root: PathLike, check_sizes: bool = False, check_decode: bool = False) -> DatasetReport:
    """Checks a dataset tree from its file names alone; ``check_sizes`` also opens every file's header
    to find unreadable files and image/label size mismatches, ``check_decode`` decodes every file
    whole to find truncated or corrupt ones (both slow on GTA5's 25k pairs, decoding the most)."""
    if kind not in CHECKED:
        raise ValueError(f"kind must be one of {sorted(CHECKED)}, got {kind!r}")
    report = DatasetReport(kind, Path(root))
    if not report.root.is_dir():
        fixes = dict.fromkeys(layout.fix(report.root) for _, layout in CHECKED[kind])
        report.problems.append(f"root {report.root} does not exist: {'; '.join(fixes)}, "
                               "or pass the folder that holds it")
        return report
    for split, layout in CHECKED[kind]:
        found = scan(layout, report.root)
        what = f"{split} {'pairs' if layout.label_dir else 'images'}".strip()
        report.counts[what] = len(found.pairs)
        report.problems += [f"missing folder {pattern}: {hint}" for pattern, hint in found.missing_dirs]
        report.problems += [f"unpaired file {path}: {UNPAIRED_HINT}" for path in found.unpaired]
        if not found.missing_dirs and not found.pairs:
            report.problems.append(f"no {what} found; expected {layout.expected(report.root)}: "
                                   f"{layout.fix(report.root)}")
        if check_sizes:
            checked = (_size_problem(image, label) for image, label in found.pairs if label is not None)
            report.problems += [problem for problem in checked if problem]
        if check_decode:
            files = (path for pair in found.pairs for path in pair if path is not None)
            report.problems += [problem for problem in map(_decode_problem, files) if problem]
    return report


def prepare_main(argv: Optional[List[str]] = None) -> int:
    """``prepare --gta5 DIR --cityscapes DIR --synthia DIR`` (any subset): prints a report per dataset;
    0 when all are fine, else 1."""
    parser = argparse.ArgumentParser(prog="train_cpsl.py prepare", description="Check dataset trees before training.")
    for kind in CHECKED:
        parser.add_argument(f"--{kind}", type=Path, metavar="DIR", help=f"the {kind} dataset root")
    parser.add_argument("--check-sizes", action="store_true", help="also open every file (slow on GTA5)")
    parser.add_argument("--check-decode", action="store_true",
                        help="also decode every file whole, to find truncated ones (slower still)")
    args = parser.parse_args(argv)
    roots = {kind: getattr(args, kind) for kind in CHECKED if getattr(args, kind) is not None}
    if not roots:
        parser.error("pass at least one of --gta5, --cityscapes, --synthia")
    reports = [check_dataset(kind, root, args.check_sizes, args.check_decode) for kind, root in roots.items()]
    for report in reports:
        print(report.message())
    return 0 if all(report.ok for report in reports) else 1
