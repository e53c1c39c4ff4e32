"""The example trainer's dataset loaders, PNG writers and ``prepare`` check (examples/cpsl_trainer/data.py)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.data import (  # noqa: E402
    CityscapesDataset,
    GTA5Dataset,
    SynthiaDataset,
    check_dataset,
    prepare_main,
    read_png16,
    write_cityscapes_label,
    write_gta5_label,
    write_rgb,
    write_synthia_label,
)
from cpsl_trainer.labels import (  # noqa: E402
    IGNORE_INDEX,
    SYNTHIA_16_TRAIN_IDS,
    cityscapes_to_train_ids,
    restrict_classes,
    synthia_to_train_ids,
)

H, W = 8, 16


def random_image(rng, size=(H, W)):
    return rng.integers(0, 256, size + (3,), dtype=np.uint8)


def random_ids(rng, size=(H, W)):
    # Ids 0..34 cover evaluated and ignored Cityscapes classes.
    return rng.integers(0, 35, size, dtype=np.uint8)


def make_gta5(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(1, n + 1):
        write_rgb(root / "images" / f"{index:05d}.png", random_image(rng))
        ids.append(random_ids(rng))
        write_gta5_label(root / "labels" / f"{index:05d}.png", ids[-1])
    return ids


def make_cityscapes(root, train_ids_files=False, seed=0):
    rng = np.random.default_rng(seed)
    ids = {}
    for split, city in (("train", "aachen"), ("val", "lindau")):
        for index in range(2):
            stem = f"{city}_{index:06d}_000019"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", random_image(rng))
            ids[split, index] = random_ids(rng)
            write_cityscapes_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids[split, index])
            if train_ids_files:
                write_cityscapes_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                                       cityscapes_to_train_ids(ids[split, index]))
    return ids


def make_synthia(root, n=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(n):
        write_rgb(root / "RGB" / f"{index:07d}.png", random_image(rng))
        class_ids = rng.integers(0, 23, (H, W), dtype=np.uint16)
        class_ids[0, :3] = [300, 1000, 65535]  # beyond 8 bits
        ids.append(class_ids)
        write_synthia_label(root / "GT" / "LABELS" / f"{index:07d}.png", class_ids,
                            instance_ids=rng.integers(0, 65536, (H, W), dtype=np.uint16))
    return ids


def test_gta5_palette_labels_are_ids_mapped_to_train_ids(tmp_path):
    ids = make_gta5(tmp_path)
    with Image.open(tmp_path / "labels" / "00001.png") as label:
        assert label.mode == "P"
    dataset = GTA5Dataset(tmp_path)
    assert len(dataset) == 3 and dataset.missing == []
    for index, sample in enumerate(dataset):
        assert sample["name"] == f"images/{index + 1:05d}.png"
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, H, W)
        assert sample["label"].dtype == torch.uint8 and sample["has_label"]
        np.testing.assert_array_equal(sample["label"].numpy(), cityscapes_to_train_ids(ids[index]))
    image = np.asarray(Image.open(tmp_path / "images" / "00002.png"))
    np.testing.assert_array_equal(dataset[1]["image"].permute(1, 2, 0).numpy(), image)


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_label_pngs_of_another_mode_are_refused_naming_the_file(tmp_path, mode):
    # An RGB labelTrainIds file came back as an (H, W, 3) label; a 16-bit one was misread.
    make_cityscapes(tmp_path / "cityscapes", train_ids_files=True)
    make_gta5(tmp_path / "gta5")
    for label in (tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png",
                  tmp_path / "gta5" / "labels" / "00001.png"):
        with Image.open(label) as image:
            ids = np.asarray(image)
        (Image.fromarray(ids).convert("RGB") if mode == "RGB" else Image.fromarray(ids.astype(np.uint16))).save(label)
    for dataset in (CityscapesDataset(tmp_path / "cityscapes", "val"), GTA5Dataset(tmp_path / "gta5")):
        with pytest.raises((OSError, ValueError), match=f"(labelTrainIds|00001).png.*got PIL mode {mode}"):
            dataset[0]


def test_gta5_unpaired_files_are_skipped_counted_and_warned_once(tmp_path):
    make_gta5(tmp_path, n=4)
    (tmp_path / "labels" / "00002.png").unlink()
    (tmp_path / "images" / "00004.png").unlink()
    with pytest.warns(UserWarning, match="skipped 2 unpaired") as caught:
        dataset = GTA5Dataset(tmp_path)
    assert len(caught) == 1
    assert [sample["name"] for sample in dataset] == ["images/00001.png", "images/00003.png"]
    assert dataset.missing == [tmp_path / "images" / "00002.png", tmp_path / "labels" / "00004.png"]


def test_size_mismatch_raises_without_size_and_is_resized_with_size(tmp_path):
    ids = make_gta5(tmp_path, n=1)
    write_rgb(tmp_path / "images" / "00001.png", random_image(np.random.default_rng(1), (2 * H, 2 * W)))
    with pytest.raises(ValueError, match=r"00001\.png is 32x16 but its label .*00001\.png is 16x8"):
        GTA5Dataset(tmp_path)[0]
    sample = GTA5Dataset(tmp_path, size=(12, 20))[0]
    assert sample["image"].shape == (3, 12, 20) and sample["label"].shape == (12, 20)
    # Nearest neighbour: no blended ids, only train ids of the original label.
    assert set(sample["label"].unique().tolist()) <= set(cityscapes_to_train_ids(ids[0]).flatten().tolist())


def test_cityscapes_label_ids_train_ids_and_unlabelled(tmp_path):
    ids = make_cityscapes(tmp_path / "ids")
    val = CityscapesDataset(tmp_path / "ids", "val")
    assert [s["name"] for s in val] == [f"leftImg8bit/val/lindau/lindau_{i:06d}_000019_leftImg8bit.png" for i in range(2)]
    np.testing.assert_array_equal(val[1]["label"].numpy(), cityscapes_to_train_ids(ids["val", 1]))

    ids = make_cityscapes(tmp_path / "train_ids", train_ids_files=True)
    # labelTrainIds holds train ids already: mapping them again would change them.
    val = CityscapesDataset(tmp_path / "train_ids", "val")
    assert all(str(label).endswith("_labelTrainIds.png") for _, label in val.pairs) and val.missing == []
    np.testing.assert_array_equal(val[0]["label"].numpy(), cityscapes_to_train_ids(ids["val", 0]))

    root = tmp_path / "unlabelled"
    make_cityscapes(root)
    shutil.rmtree(root / "gtFine")
    train = CityscapesDataset(root, "train", size=(4, 8), with_labels=False)
    batch = next(iter(DataLoader(train, batch_size=2)))
    assert batch["image"].shape == (2, 3, 4, 8)
    assert batch["label"].shape == (2, 0)  # no full-size dummy labels through the loader
    assert batch["has_label"].tolist() == [False, False]
    with pytest.raises(FileNotFoundError, match="gtFine_trainvaltest.zip"):
        CityscapesDataset(root, "train")


def test_synthia_16_bit_labels_round_trip(tmp_path):
    ids = make_synthia(tmp_path)
    path = tmp_path / "GT" / "LABELS" / "0000000.png"
    pixels = read_png16(path)
    assert pixels.dtype == np.uint16 and pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(pixels[..., 0], ids[0])
    pillow = np.asarray(Image.open(path).convert("RGB"))[..., 0]
    assert not np.array_equal(pillow, ids[0])  # why read_png16 exists
    dataset = SynthiaDataset(tmp_path)
    np.testing.assert_array_equal(dataset[1]["label"].numpy(), synthia_to_train_ids(ids[1]))
    assert dataset[0]["label"][0, :3].tolist() == [IGNORE_INDEX] * 3


def test_classes_renumber_labels(tmp_path):
    ids = make_synthia(tmp_path)
    label = SynthiaDataset(tmp_path, classes=SYNTHIA_16_TRAIN_IDS)[0]["label"].numpy()
    expected = restrict_classes(synthia_to_train_ids(ids[0]), SYNTHIA_16_TRAIN_IDS)
    np.testing.assert_array_equal(label, expected)
    assert set(label.flatten().tolist()) - {IGNORE_INDEX} <= set(range(16))
    assert (label == 15).any()  # bicycle (train id 18) is the 16th kept class


def test_missing_root_and_empty_folders_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected .*images.\*\.png with .*labels.\*\.png"):
        GTA5Dataset(tmp_path / "nowhere")
    (tmp_path / "RGB").mkdir()
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no pairs found; expected .*RGB.\*\.png.*synthia-dataset\.net"):
        SynthiaDataset(tmp_path)


def test_check_dataset_good_and_broken_trees(tmp_path):
    make_gta5(tmp_path / "gta5")
    make_cityscapes(tmp_path / "cityscapes")
    make_synthia(tmp_path / "synthia")
    for kind in ("gta5", "cityscapes", "synthia"):
        report = check_dataset(kind, tmp_path / kind, check_sizes=True)
        assert report.ok and report.problems == [], report.message()
        assert "OK" in report.message()
    assert check_dataset("gta5", tmp_path / "gta5").counts == {"pairs": 3}
    assert check_dataset("cityscapes", tmp_path / "cityscapes").counts == {"train images": 2, "val pairs": 2}

    (tmp_path / "gta5" / "labels" / "00003.png").unlink()
    write_rgb(tmp_path / "gta5" / "images" / "00001.png", random_image(np.random.default_rng(0), (4, 4)))
    report = check_dataset("gta5", tmp_path / "gta5", check_sizes=True)
    assert report.counts == {"pairs": 2} and len(report.problems) == 2
    assert "unpaired file" in report.message() and "00003.png" in report.message()
    assert "size mismatch" in report.message() and "00001.png is 4x4" in report.message()

    shutil.rmtree(tmp_path / "cityscapes" / "gtFine" / "val")
    message = check_dataset("cityscapes", tmp_path / "cityscapes").message()
    assert "missing folder" in message and "gtFine_trainvaltest.zip" in message and str(tmp_path / "cityscapes") in message
    assert "nowhere" in check_dataset("synthia", tmp_path / "nowhere").message()
    with pytest.raises(ValueError, match="kind"):
        check_dataset("kitti", tmp_path)


def test_prepare_main_return_codes(tmp_path, capsys):
    make_gta5(tmp_path / "gta5")
    make_synthia(tmp_path / "synthia")
    assert prepare_main(["--gta5", str(tmp_path / "gta5"), "--synthia", str(tmp_path / "synthia")]) == 0
    out = capsys.readouterr().out
    assert "gta5" in out and "synthia" in out and "problem" not in out
    assert prepare_main(["--gta5", str(tmp_path / "gta5"), "--cityscapes", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_main([])


def test_a_truncated_png_is_an_error_naming_it_and_prepare_can_decode_every_file(tmp_path):
    make_gta5(tmp_path / "gta5")
    broken = tmp_path / "gta5" / "images" / "00002.png"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    dataset = GTA5Dataset(tmp_path / "gta5")
    with pytest.raises(OSError, match=r"images/00002\.png"):
        dataset[1]
    assert check_dataset("gta5", tmp_path / "gta5").ok  # file names alone look fine
    report = check_dataset("gta5", tmp_path / "gta5", check_decode=True)
    assert len(report.problems) == 1 and "undecodable file" in report.message() and "00002.png" in report.message()
    assert prepare_main(["--gta5", str(tmp_path / "gta5"), "--check-decode"]) == 1


@pytest.mark.parametrize("keep", [0, 60])
def test_a_truncated_soft_pseudo_label_is_an_error_naming_it(tmp_path, keep):
    from cpsl_trainer.training import WithSoftLabels, soft_label_file

    path = soft_label_file(tmp_path, "train/city/a.png")
    np.save(path, np.zeros((19, 8, 16), dtype=np.float16))
    images = [{"name": "train/city/a.png", "image": torch.zeros(3, 8, 16, dtype=torch.uint8)}]
    assert WithSoftLabels(images, tmp_path)[0]["soft"].shape == (19, 8, 16)
    path.write_bytes(path.read_bytes()[:keep])  # a job killed while writing, a full disk
    with pytest.raises(OSError, match=str(path)):
        WithSoftLabels(images, tmp_path)[0]
