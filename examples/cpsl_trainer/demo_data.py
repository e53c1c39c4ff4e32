"""Synthetic street scenes written in the real GTA5 and Cityscapes on-disk formats, for the demo.

Both domains draw the same kind of scene (sky, buildings, trees, road, sidewalks, cars, people) with
class-specific textures, every object large enough to survive the model's output stride of 8 on
96×192 images (poles and signs would not). The target differs the way Cityscapes differs from a
game: another colour grading (darker, desaturated, tinted), sensor noise and blur, other object
colours and other class frequencies (more cars and people, fewer trees). A source-only model
transfers only in part; self-training on the target closes much of the gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .data import write_cityscapes_label, write_gta5_label, write_rgb
from .labels import CITYSCAPES_ID_TO_TRAIN_ID

TRAIN_TO_LABEL_ID: Dict[int, int] = {train: label for label, train in CITYSCAPES_ID_TO_TRAIN_ID.items()}
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 8, 10, 11, 13
EGO_VEHICLE_ID = 1  # a Cityscapes void id: the car's bonnet at the bottom of target images


@dataclass(frozen=True)
class DomainStyle:
    """How one domain renders and populates its scenes."""

    colours: Dict[int, Tuple[int, int, int]]
    vegetation_prob: float
    cars: Tuple[int, int]
    people: Tuple[int, int]
    car_colours: Sequence[Tuple[int, int, int]]
    gain: Tuple[float, float, float]  # per-channel colour grading
    offset: float
    saturation: float
    noise: float
    blur: bool
    ego_vehicle: bool


SOURCE_STYLE = DomainStyle(
    colours={ROAD: (110, 100, 110), SIDEWALK: (190, 150, 170), BUILDING: (150, 120, 90),
             VEGETATION: (60, 170, 40), SKY: (110, 170, 240), PERSON: (200, 60, 70)},
    vegetation_prob=0.45, cars=(0, 3), people=(0, 2),
    car_colours=((200, 30, 30), (30, 60, 200), (230, 230, 230), (40, 40, 40)),
    gain=(1.0, 1.0, 1.0), offset=0.0, saturation=1.0, noise=4.0, blur=False, ego_vehicle=False,
)
TARGET_STYLE = DomainStyle(
    colours=SOURCE_STYLE.colours, vegetation_prob=0.2, cars=(2, 5), people=(1, 4),
    car_colours=((60, 90, 150), (20, 20, 60), (200, 200, 190), (140, 40, 40)),
    gain=(0.8, 0.9, 1.05), offset=-5.0, saturation=0.65, noise=9.0, blur=True, ego_vehicle=True,
)


def _texture(rng: np.random.Generator, train_id: int, shape: Tuple[int, int]) -> np.ndarray:
    """A (H, W) brightness modulation that tells the classes apart by pattern, not just colour."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    if train_id == BUILDING:  # rows of windows
        return np.where((ys % 6 < 3) & (xs % 5 < 2), -45.0, 0.0)
    if train_id == SIDEWALK:  # paving tiles
        return np.where((ys % 6 < 2) | (xs % 10 < 2), -35.0, 0.0)
    if train_id == VEGETATION:  # leafy blobs
        return rng.normal(0, 28, shape)
    if train_id == ROAD:  # fine asphalt grain
        return rng.normal(0, 6, shape)
    if train_id == SKY:  # lighter towards the horizon
        return np.linspace(-20, 25, height)[:, None].repeat(width, 1)
    return np.zeros(shape)


def draw_scene(rng: np.random.Generator, style: DomainStyle, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 Cityscapes label-id map."""
    height, width = size
    train = np.full(size, SKY, dtype=np.int64)
    ys, xs = np.mgrid[0:height, 0:width]
    horizon = int(rng.uniform(0.35, 0.5) * height)

    # Buildings and trees along the horizon, in blocks of random width and height.
    left = 0
    while left < width:
        block = int(rng.uniform(0.1, 0.25) * width)
        top = horizon - int(rng.uniform(0.1, 0.35) * height)
        train[top:horizon, left:left + block] = VEGETATION if rng.random() < style.vegetation_prob else BUILDING
        left += block

    # The road widens towards the bottom; sidewalks on both sides.
    below = ys >= horizon
    depth = (ys - horizon) / max(height - horizon, 1)
    centre = rng.uniform(0.4, 0.6) * width
    half_width = 0.05 * width + depth * rng.uniform(0.45, 0.7) * width
    train[below] = SIDEWALK
    train[below & (np.abs(xs - centre) < half_width)] = ROAD

    # Objects: cars on the road, people on the sidewalk, larger when nearer.
    objects = np.zeros(size + (3,))
    for kind, count in ((CAR, rng.integers(*style.cars, endpoint=True)), (PERSON, rng.integers(*style.people, endpoint=True))):
        for _ in range(count):
            foot = int(rng.uniform(horizon + 0.1 * (height - horizon), height))
            scale = (foot - horizon) / max(height - horizon, 1)
            obj_h, obj_w = (int(4 + 20 * scale), int(8 + 36 * scale)) if kind == CAR else (int(16 + 30 * scale), int(8 + 12 * scale))
            row = train[min(foot, height - 1)]
            places = np.flatnonzero(row == (ROAD if kind == CAR else SIDEWALK))
            if len(places) == 0:
                continue
            x = int(rng.choice(places)) - obj_w // 2
            region = (slice(max(foot - obj_h, 0), foot), slice(max(x, 0), max(x + obj_w, 0)))
            train[region] = kind
            colour = style.car_colours[rng.integers(len(style.car_colours))] if kind == CAR else style.colours[PERSON]
            objects[region] = colour

    image = np.zeros(size + (3,))
    for train_id, colour in style.colours.items():
        mask = train == train_id
        image[mask] = np.asarray(colour, dtype=np.float64) + _texture(rng, train_id, size)[mask, None]
    cars = train == CAR
    image[cars] = objects[cars] + np.where((ys[cars] % 7) < 2, 35.0, 0.0)[:, None]  # window band

    grey = image.mean(2, keepdims=True)
    image = grey + style.saturation * (image - grey)
    image = image * np.asarray(style.gain) + style.offset
    if style.blur:
        image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, (1, 1), (0, 1))) / 4
    image = image + rng.normal(0, style.noise, image.shape)
    label_ids = np.vectorize(TRAIN_TO_LABEL_ID.get)(train).astype(np.uint8)
    if style.ego_vehicle:
        bonnet = ys >= height - max(height // 16, 2)
        image[bonnet] = 15.0
        label_ids[bonnet] = EGO_VEHICLE_ID
    return np.clip(image, 0, 255).astype(np.uint8), label_ids


def write_demo_datasets(
    root: Path,
    size: Tuple[int, int] = (96, 192),
    source_images: int = 200,
    target_train_images: int = 100,
    target_val_images: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> Tuple[Path, Path]:
    """Writes ``root/GTA5`` and ``root/cityscapes`` trees; returns their paths. Reuses a complete tree."""
    gta5, cityscapes = Path(root) / "GTA5", Path(root) / "cityscapes"
    marker = Path(root) / f"complete-{size[0]}x{size[1]}-{source_images}-{target_train_images}-{target_val_images}-{seed}"
    if marker.exists():
        return gta5, cityscapes
    rng = np.random.default_rng(seed)
    jobs = [("source", i) for i in range(source_images)]
    jobs += [("train", i) for i in range(target_train_images)] + [("val", i) for i in range(target_val_images)]
    for split, index in tqdm(jobs, desc="demo data", disable=not progress, leave=False):
        image, label_ids = draw_scene(rng, SOURCE_STYLE if split == "source" else TARGET_STYLE, size)
        if split == "source":
            write_rgb(gta5 / "images" / f"{index + 1:05d}.png", image)
            write_gta5_label(gta5 / "labels" / f"{index + 1:05d}.png", label_ids)
            continue
        city = "demotown" if split == "train" else "demoville"
        stem = f"{city}_{index // 50:06d}_{index % 50:06d}"
        write_rgb(cityscapes / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        write_cityscapes_label(cityscapes / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
    marker.touch()
    return gta5, cityscapes
