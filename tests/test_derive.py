"""pipelines.dataset.derive: greyscale, Canny edges, palettes, label colours (real CamVid + synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.dataset.derive import (
    Palette,
    canny_edges,
    canny_thresholds,
    colorize_labels,
    grayscale,
    remap_labels,
)
from pipelines.images import BadInput, decode_image, decode_label_mask

CAMVID_KEY = "0001TP_006690"


@pytest.fixture(scope="module")
def camvid_photo(camvid_dir: Path) -> np.ndarray:
    return decode_image((camvid_dir / "train" / "images" / f"{CAMVID_KEY}.jpg").read_bytes())


@pytest.fixture(scope="module")
def camvid_mask(camvid_dir: Path) -> np.ndarray:
    return decode_label_mask((camvid_dir / "train" / "labels" / f"{CAMVID_KEY}.png").read_bytes())


@pytest.fixture(scope="module")
def camvid_palette(camvid_dir: Path) -> Palette:
    return Palette.from_classes_json(camvid_dir / "classes.json")


# ----------------------------------------------------------------------------------------------------
# Greyscale and Canny
# ----------------------------------------------------------------------------------------------------


def test_grayscale_is_bt601() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    gray = grayscale(rgb)
    assert gray.shape == (17, 23) and gray.dtype == np.uint8
    assert np.array_equal(gray, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray - luma).max() <= 1.0
    assert grayscale(gray) is gray
    assert tuple(grayscale(np.array([[[255, 0, 0]]], np.uint8)).ravel()) == (76,)  # red, not blue (RGB order)


# The last two lie either side of 2**24 pixels, where the median's histogram changes hands (`_median_u8`).
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 9), (10, 10), (31, 64), (4096, 4095), (4096, 4097)])
def test_threshold_median_matches_numpy(shape: tuple[int, int]) -> None:
    gray = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    low, high = canny_thresholds(gray, 0.33)
    median = float(np.median(gray))
    assert low == pytest.approx(max(0.0, 0.67 * median)) and high == pytest.approx(min(255.0, 1.33 * median))


def test_thresholds_clip() -> None:
    assert canny_thresholds(np.full((4, 4), 250, np.uint8)) == (pytest.approx(167.5), 255.0)
    assert canny_thresholds(np.full((4, 4), 100, np.uint8), sigma=2.0) == (0.0, pytest.approx(255.0))


def test_canny_on_real_photo(camvid_photo: np.ndarray) -> None:
    low, high = canny_thresholds(grayscale(camvid_photo))
    assert 0 < low < high <= 255
    edges = canny_edges(camvid_photo)
    assert edges.shape == camvid_photo.shape[:2] and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    edge_fraction = float((edges == 0).mean())  # black edges on white
    assert 0.01 < edge_fraction < 0.40
    assert np.array_equal(canny_edges(camvid_photo, low, high), edges)  # the recorded thresholds reproduce it
    inverted = canny_edges(camvid_photo, invert=True)
    assert np.array_equal(inverted, 255 - edges)
    unblurred = canny_edges(camvid_photo, blur=0)
    assert (unblurred == 0).mean() > edge_fraction  # blurring removes texture edges
    assert np.array_equal(canny_edges(grayscale(camvid_photo)), edges)  # greyscale input works too


def test_canny_synthetic_square() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    edges = canny_edges(img, 50, 150, blur=0)
    assert edges[32, 32] == 255 and edges[2, 2] == 255  # flat areas are background
    assert (edges[14:18, 32] == 0).any()  # the square's top side is an edge
    assert (canny_edges(np.full((32, 32, 3), 128, np.uint8)) == 255).all()  # flat image: no edges


def test_canny_argument_errors() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="both"):
        canny_edges(img, low=10)
    with pytest.raises(ValueError, match="odd"):
        canny_edges(img, blur=4)
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(img, 100, 50)
    with pytest.raises(ValueError, match="uint8"):
        canny_edges(img.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# Palettes
# ----------------------------------------------------------------------------------------------------


def test_camvid_palette(camvid_dir: Path, camvid_palette: Palette) -> None:
    assert len(camvid_palette.colors) == 12 and camvid_palette.ignore_id == 11
    assert camvid_palette.colors[3] == (128, 64, 128) and camvid_palette.names[3] == "Road"
    assert camvid_palette.ignore_color == (0, 0, 0)
    spec = json.loads((camvid_dir / "classes.json").read_text())
    assert Palette.from_classes_json(spec) == camvid_palette
    assert Palette.load(str(camvid_dir / "classes.json")) == camvid_palette
    assert Palette.from_classes_json(camvid_palette.to_dict()) == camvid_palette
    assert json.loads(json.dumps(camvid_palette.to_dict()))["classes"][0] == {
        "id": 0,
        "name": "Sky",
        "color": [128, 128, 128],
    }


def test_cityscapes_palette() -> None:
    palette = Palette.load("cityscapes")
    assert sorted(palette.colors) == list(range(19)) and palette.ignore_id == 255
    assert palette.colors[0] == (128, 64, 128) and palette.names[0] == "road"
    assert palette.colors[13] == (0, 0, 142) and palette.names[13] == "car"
    assert palette.colors[18] == (119, 11, 32) and palette.names[18] == "bicycle"
    assert palette.ignore_color == (0, 0, 0)
    assert palette.to_dict()["ignore_id"] == 255


def test_csv_palette(tmp_path: Path) -> None:
    path = tmp_path / "palette.csv"
    path.write_text("id,name,r,g,b\n0,background,0,0,0\n1,cat,255,0,0\n\n7,dog, 0, 0,255\n")
    palette = Palette.load(str(path))
    assert palette.colors == {0: (0, 0, 0), 1: (255, 0, 0), 7: (0, 0, 255)}
    assert palette.names[7] == "dog" and palette.ignore_id is None
    assert Palette.from_file(path, ignore_id=0).ignore_id == 0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,name,r,g\n0,a,1,2\n", "missing b"),
        ("id,name,r,g,b\n0,a,1,2,300\n", "0..255"),
        ("id,name,r,g,b\n0,a,1,2,3\n0,b,1,2,3\n", "appears twice"),
        ("id,name,r,g,b\nx,a,1,2,3\n", "expected id,name,r,g,b"),
    ],
)
def test_bad_csv_palettes(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Palette.from_file(path)


def test_bad_palette_specs() -> None:
    with pytest.raises(ValueError, match="cityscapes"):
        Palette.load("ade20k")
    with pytest.raises(ValueError, match="classes"):
        Palette.from_classes_json({"colors": []})
    with pytest.raises(ValueError, match="colour"):
        Palette.from_classes_json({"classes": [{"id": 0, "name": "x", "color": [1, 2]}]})


# ----------------------------------------------------------------------------------------------------
# Colourising label maps
# ----------------------------------------------------------------------------------------------------


def test_colorize_real_mask(camvid_mask: np.ndarray, camvid_palette: Palette) -> None:
    colored = colorize_labels(camvid_mask, camvid_palette)
    assert colored.shape == (*camvid_mask.shape, 3) and colored.dtype == np.uint8
    counts = np.bincount(camvid_mask.ravel())
    most_common = int(counts.argmax())
    ys, xs = np.nonzero(camvid_mask == most_common)
    assert tuple(colored[ys[0], xs[0]]) == camvid_palette.colors[most_common]
    for cid in np.unique(camvid_mask).tolist():
        expected = np.array(camvid_palette.colors[cid], np.uint8)
        assert (colored[camvid_mask == cid] == expected).all()


def test_ids_outside_palette(camvid_palette: Palette) -> None:
    ids = np.array([[0, 12, 3], [40, 11, 12]], np.uint8)
    with pytest.raises(BadInput) as info:
        colorize_labels(ids, camvid_palette)
    assert str(info.value) == "label mask has ids outside the palette: [12, 40] (palette ids 0..11)"
    many = np.arange(100, 130, dtype=np.uint16).reshape(5, 6)
    with pytest.raises(BadInput, match=r"\[100, 101, .*, 109, \.\.\. \(30 in all\)\]"):
        colorize_labels(many, camvid_palette)
    with pytest.raises(BadInput, match=r"\[70000\]"):
        colorize_labels(np.array([[70000, 1]], np.int64), camvid_palette)
    with pytest.raises(BadInput, match=r"\[-1\]"):
        colorize_labels(np.array([[-1, 1]], np.int32), camvid_palette)


def test_ignore_and_remap() -> None:
    palette = Palette.cityscapes()
    ids = np.array([[0, 255], [13, 33]], np.uint16)
    with pytest.raises(BadInput, match=r"after remap: \[33\] \(palette ids 0\.\.18, 255\)"):
        colorize_labels(ids, palette, remap={13: 1})
    colored = colorize_labels(ids, palette, remap={33: 255, 13: 1})
    assert tuple(colored[0, 0]) == (128, 64, 128)  # road
    assert tuple(colored[0, 1]) == (0, 0, 0) and tuple(colored[1, 1]) == (0, 0, 0)  # ignore -> black
    assert tuple(colored[1, 0]) == (244, 35, 232)  # 13 remapped to sidewalk
    # an explicit ignore id overrides the palette's; its colour is the palette's when it has one
    colored = colorize_labels(np.array([[0, 2]], np.uint8), palette, ignore_id=2)
    assert tuple(colored[0, 1]) == (70, 70, 70)
    with pytest.raises(BadInput, match=r"\[255\] \(palette ids 0\.\.18\)"):  # 255 is no longer the ignore id
        colorize_labels(np.array([[0, 255]], np.uint8), palette, ignore_id=2)
    colored = colorize_labels(np.array([[0, 250]], np.uint8), palette, ignore_id=250)
    assert tuple(colored[0, 1]) == (0, 0, 0)


def test_camvid_ignore_uses_palette_colour(camvid_palette: Palette) -> None:
    shifted = Palette(dict(camvid_palette.colors) | {11: (9, 9, 9)}, camvid_palette.names, 11)
    assert tuple(colorize_labels(np.array([[11]], np.uint8), shifted)[0, 0]) == (9, 9, 9)


def test_remap_labels_dtype() -> None:
    ids = np.array([[0, 1, 2]], np.uint8)
    assert remap_labels(ids, {2: 7}).tolist() == [[0, 1, 7]] and remap_labels(ids, {2: 7}).dtype == np.uint8
    wide = remap_labels(ids, {2: 300})
    assert wide.tolist() == [[0, 1, 300]] and wide.dtype == np.uint16
    with pytest.raises(ValueError, match="class ids must be integers"):
        colorize_labels(np.zeros((2, 2), np.float32), Palette.cityscapes())
