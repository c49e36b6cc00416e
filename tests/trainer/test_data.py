import itertools
import random
import shutil
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.imaging import ImageError, read_image, read_mask, write_image
from trainer.data import synth
from trainer.data.mvtec import DatasetError, Sample, discover_classes, load_samples, split_train_val

SMALL = {"size": 96, "n_train": 4, "n_test_good": 2, "n_test_defect": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=1, **SMALL)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- generator

def test_layout_is_mvtec_ad(dataset: Path):
    assert discover_classes(dataset) == sorted(synth.CLASSES)
    assert set(synth.DEFECTS) == set(synth.CLASSES)
    assert len({d for ds in synth.DEFECTS.values() for d in ds}) >= 4
    for cls in synth.CLASSES:
        expected = {f"train/good/{i:03d}.png" for i in range(4)} | {f"test/good/{i:03d}.png" for i in range(2)}
        for d in synth.DEFECTS[cls]:
            expected |= {f"test/{d}/{i:03d}.png" for i in range(2)}
            expected |= {f"ground_truth/{d}/{i:03d}_mask.png" for i in range(2)}
        assert set(files_under(dataset / cls)) == expected, cls


def test_images_and_masks_are_aligned_and_non_empty(dataset: Path):
    for cls in synth.CLASSES:
        h, w = synth.image_shape(cls, 96)
        for s in load_samples(dataset, [cls], "test"):
            img = read_image(s.path)
            assert img.shape == (h, w, 3)
            if s.label:
                raw = cv2.imread(str(s.mask_path), cv2.IMREAD_UNCHANGED)
                assert raw.shape == (h, w) and set(np.unique(raw)) <= {0, 255}
                assert read_mask(s.mask_path).sum() >= 1
    assert synth.image_shape("screw", 96) == (96, 120)   # one class is not square


@pytest.mark.parametrize("cls", synth.CLASSES)
def test_a_defect_changes_its_scene_only_inside_its_mask(cls):
    """A defect image and its good twin (same scene stream) differ only near the mask, and clearly inside it."""
    size = 96
    h, w = synth.image_shape(cls, size)
    render = synth.images._RENDER[cls]
    for defect in synth.DEFECTS[cls]:
        for k in range(2):
            good, none = render(h, w, np.random.default_rng(k), None, np.random.default_rng(50 + k))
            bad, mask = render(h, w, np.random.default_rng(k), defect, np.random.default_rng(50 + k))
            assert none is None and mask.dtype == bool and mask.shape == (h, w) and mask.any()
            diff = np.abs(bad - good).max(-1)
            near = cv2.dilate(mask.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
            assert not (diff[~near] > 0.03).any(), (defect, k)
            assert diff[mask].mean() > 0.01, (defect, k)


def test_same_seed_same_files_and_subsets_agree(dataset: Path, tmp_path: Path):
    again = synth.generate(tmp_path / "again", seed=1, **SMALL)
    assert files_under(again) == files_under(dataset)
    # one image's content does not depend on which other classes were generated
    washer = synth.generate(tmp_path / "washer", seed=1, classes=["washer"], **SMALL)
    assert files_under(washer / "washer") == files_under(dataset / "washer")
    img, mask = synth.render("washer", "missing", seed=1, index=1, size=96)
    assert np.array_equal(img, read_image(dataset / "washer/test/missing/001.png"))
    assert np.array_equal(mask, read_mask(dataset / "washer/ground_truth/missing/001_mask.png"))


def test_another_seed_gives_other_images(dataset: Path, tmp_path: Path):
    other = synth.generate(tmp_path / "other", seed=2, classes=["brick"], **SMALL)
    a, b = files_under(dataset / "brick"), files_under(other / "brick")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("train"))


def test_train_images_vary(dataset: Path):
    for cls in synth.CLASSES:
        imgs = [read_image(p).astype(np.float32) for p in sorted((dataset / cls / "train/good").glob("*.png"))]
        assert min(np.abs(a - b).mean() for a, b in itertools.pairwise(imgs)) > 1.0, cls


def test_a_thin_defect_at_a_small_size_still_has_a_mask() -> None:
    img, mask = synth.render("pcb", "extra", seed=3, index=2, size=64)   # a solder bridge thinner than a pixel
    assert mask is not None and mask.any() and mask.shape == img.shape[:2]


def test_regenerating_replaces_own_output_but_never_a_foreign_folder(tmp_path: Path):
    out = tmp_path / "data"
    small = dict(SMALL, n_train=2, n_test_defect=1, n_test_good=1)
    calls: list[tuple[int, int]] = []
    synth.generate(out, classes=["grass"], progress=lambda d, t: calls.append((d, t)), **small)
    total = 2 + 1 + len(synth.DEFECTS["grass"])
    assert calls[-1] == (total, total) and len(calls) == total
    stale = out / "grass/train/good/999.png"
    stale.write_bytes(b"left over")
    synth.generate(out, classes=["grass"], **small)
    assert not stale.exists()

    foreign = tmp_path / "mine"
    (foreign / "grass/train/good").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by this generator"):
        synth.generate(foreign, classes=["grass"], **small)
    assert (foreign / "grass/train/good").is_dir()


def test_generator_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown class"):
        synth.generate(tmp_path, classes=["bottle"])
    with pytest.raises(ValueError, match="size"):
        synth.generate(tmp_path, size=16)
    with pytest.raises(ValueError, match="no defect"):
        synth.render("pcb", "crack")


def test_texture_photographs_load_without_network(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during data generation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    synth.textures._photo.cache_clear()
    for name in set(synth.textures._PHOTO.values()) | set(synth.textures._FOREIGN.values()):
        assert synth.textures._photo(name).shape[0] >= 256


# ----------------------------------------------------------------------------- loader

def test_loader_reads_the_generated_set(dataset: Path):
    train = load_samples(dataset, None, "train")
    assert len(train) == 4 * len(synth.CLASSES)
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    test = load_samples(dataset, ["screw", "brick"], "test", verify=True)
    assert [s.cls for s in test] == ["screw"] * 8 + ["brick"] * 10   # the order asked for
    screw = test[:8]
    assert [s.defect for s in screw] == ["good"] * 2 + [d for d in sorted(synth.DEFECTS["screw"]) for _ in range(2)]
    for s in test:
        assert (s.label == 1) == (s.defect != "good") == (s.mask_path is not None)
        if s.mask_path:
            assert s.mask_path == dataset / s.cls / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"


def make_class(root: Path, cls: str = "part", train: int = 2, good: int = 1, defects: dict | None = None,
               ext: str = ".png") -> Path:
    img = np.full((8, 10, 3), 120, np.uint8)
    mask = np.zeros((8, 10), np.uint8)
    mask[2:4, 3:6] = 255
    for i in range(train):
        write_image(root / cls / "train/good" / f"{i:03d}{ext}", img)
    for i in range(good):
        write_image(root / cls / "test/good" / f"{i:03d}{ext}", img)
    for d, n in (defects or {"dent": 1}).items():
        for i in range(n):
            write_image(root / cls / "test" / d / f"{i:03d}{ext}", img)
            write_image(root / cls / "ground_truth" / d / f"{i:03d}_mask.png", mask)
    return root


def test_loader_accepts_any_image_extension_and_ignores_other_files(tmp_path: Path):
    make_class(tmp_path, "a", ext=".JPG")
    make_class(tmp_path, "b", ext=".tiff")
    make_class(tmp_path, "c", ext=".bmp")
    write_image(tmp_path / "c/train/good/10.jpeg", np.zeros((8, 10, 3), np.uint8))
    write_image(tmp_path / "c/train/good/9.png", np.zeros((8, 10, 3), np.uint8))
    (tmp_path / "c/train/good/readme.txt").write_text("notes")
    (tmp_path / "c/train/good/.DS_Store").write_bytes(b"\0\0")
    (tmp_path / "license.txt").write_text("terms")
    assert discover_classes(tmp_path) == ["a", "b", "c"]
    assert len(load_samples(tmp_path, None, "test", verify=True)) == 6
    names = [s.path.name for s in load_samples(tmp_path, ["c"], "train")]
    assert names == ["000.bmp", "001.bmp", "9.png", "10.jpeg"]   # natural order


def error_of(root: Path, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_samples(root, *args, **kwargs)
    return str(info.value)


def test_missing_train_good_is_named(tmp_path: Path):
    make_class(tmp_path, train=0)
    assert "part/train/good: missing" in error_of(tmp_path, None, "train")


def test_empty_folder_is_named(tmp_path: Path):
    make_class(tmp_path, defects={"dent": 1, "scratch": 0})
    (tmp_path / "part/test/scratch").mkdir()
    msg = error_of(tmp_path, None, "test")
    assert "part/test/scratch: no images" in msg and "remove the folder" in msg


def test_defect_image_without_mask_names_the_expected_mask(tmp_path: Path):
    make_class(tmp_path, defects={"dent": 2})
    (tmp_path / "part/ground_truth/dent/001_mask.png").unlink()
    msg = error_of(tmp_path, ["part"], "test")
    assert "test/dent/001.png: defect image without a mask" in msg
    assert "ground_truth/dent/001_mask.png" in msg
    # a good test image needs no mask, and the train split never does
    assert len(load_samples(tmp_path, ["part"], "train")) == 2


def test_a_defect_folder_without_a_mask_folder_is_labelled_per_image(tmp_path: Path):
    make_class(tmp_path, defects={"dent": 2, "mixed": 3})
    shutil.rmtree(tmp_path / "part/ground_truth/mixed")            # as plants often label: image-level only
    test = load_samples(tmp_path, ["part"], "test", verify=True)
    assert [(s.defect, s.label, s.mask_path is not None) for s in test] == (
        [("good", 0, False)] + [("dent", 1, True)] * 2 + [("mixed", 1, False)] * 3)


def test_image_level_defects_count_for_image_metrics_only() -> None:
    from shared.metrics import auroc, pixel_auroc
    from shared.scoring import calibrate
    from trainer.evaluate import class_metrics

    rng = np.random.default_rng(0)
    maps = [rng.random((8, 8)) for _ in range(4)]
    maps[1][2:4, 2:4] += 2.0                                          # the one masked defect, found
    masks = [np.zeros((8, 8), bool), np.zeros((8, 8), bool), None, None]
    masks[1][2:4, 2:4] = True
    scores, labels = np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 1, 1])
    m = class_metrics(scores, labels, maps, masks, calibrate(np.array([0.1, 0.2, 0.3])), auroc, pixel_auroc,
                      lambda *a, **k: 0.0, lambda s, y: (0.0, 0.0))
    assert m["image_auroc"] == pytest.approx(auroc(scores, labels)) and m["n_anomalous"] == 3
    assert m["n_pixel_labelled"] == 1
    assert m["pixel_auroc"] == pytest.approx(pixel_auroc(maps[:2], masks[:2]))   # the two without masks left out


def test_unreadable_images_are_all_listed(tmp_path: Path):
    make_class(tmp_path, train=3)
    (tmp_path / "part/train/good/001.png").write_bytes(b"")
    (tmp_path / "part/train/good/002.png").write_bytes(b"this is not a png")
    msg = error_of(tmp_path, None, "train")
    assert "2 problem(s)" in msg
    assert "001.png: empty file" in msg and "002.png: not a recognised image" in msg


def test_hostile_images_are_named_by_the_dataset_check_and_by_training_s_loader(tmp_path: Path):
    from tests.hostile_images import png_claiming, truncated_jpeg
    from trainer.data.frames import load_frames

    make_class(tmp_path, train=3)
    bomb = tmp_path / "part/train/good/001.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    (tmp_path / "part/train/good/002.png").write_bytes(truncated_jpeg())
    msg = error_of(tmp_path, None, "train", verify=True)
    assert f"{bomb}: PNG of 100000 x 100000 pixels (10000.0 MP) is over the 50 MP limit" in msg
    assert "002.png: not a decodable JPEG image (corrupt or truncated?): replace or remove the file" in msg
    paths = [tmp_path / "part/train/good/000.png", bomb]
    with pytest.raises(ImageError, match=rf"^{bomb}: PNG of 100000 x 100000 pixels"):
        load_frames(paths, 32)


def test_verify_checks_mask_size_and_content(tmp_path: Path):
    make_class(tmp_path, defects={"dent": 2})
    write_image(tmp_path / "part/ground_truth/dent/000_mask.png", np.zeros((8, 10), np.uint8))
    write_image(tmp_path / "part/ground_truth/dent/001_mask.png", np.full((4, 5), 255, np.uint8))
    assert len(load_samples(tmp_path, None, "test")) == 3   # header checks pass
    msg = error_of(tmp_path, None, "test", verify=True)
    assert "000_mask.png: mask is empty" in msg
    assert "001_mask.png: mask is 5x4 but its image 001.png is 10x8" in msg


def test_bad_roots_and_classes(tmp_path: Path):
    with pytest.raises(DatasetError, match="no such data folder"):
        discover_classes(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        discover_classes(tmp_path)
    make_class(tmp_path, "part")
    assert "no class folder for 'bottle'; classes here: part" in error_of(tmp_path, ["bottle"], "train")
    with pytest.raises(ValueError, match="split"):
        load_samples(tmp_path, None, "val")


def samples_of(classes: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/d/{c}/train/good/{i:03d}.png"), c, 0, "good", None)
            for c, n in classes.items() for i in range(n)]


def test_split_is_per_class_deterministic_and_order_free():
    samples = samples_of({"a": 20, "b": 7, "c": 1})
    train, val = split_train_val(samples, 0.2, seed=3)
    assert sorted(map(str, train + val)) == sorted(map(str, samples)) and not set(train) & set(val)
    assert [sum(s.cls == c for s in val) for c in "abc"] == [4, 1, 0]
    assert split_train_val(samples, 0.2, seed=3) == (train, val)
    assert split_train_val(samples, 0.2, seed=4)[1] != val
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_train_val(shuffled, 0.2, seed=3)[1]) == set(val)
    # a class splits the same way whatever else is loaded with it
    alone = split_train_val(samples_of({"a": 20}), 0.2, seed=3)[1]
    assert alone == [s for s in val if s.cls == "a"]
    assert train == [s for s in samples if s not in set(val)]   # input order kept


def test_split_keeps_both_sides_non_empty_and_checks_its_fraction():
    train, val = split_train_val(samples_of({"a": 2}), 0.01)
    assert len(train) == 1 and len(val) == 1
    assert split_train_val(samples_of({"a": 5}), 0.0) == (samples_of({"a": 5}), [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(samples_of({"a": 5}), 1.0)
