"""One preprocessing for evaluation and serving: `p2p evaluate` (the loader's eval path) and `p2p translate`
(the Translator actor) feed the generator identical tensors for the same image, in every preprocess mode and
at native resolution (the stored image itself)."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_shard_loader import LABELS_FORMAT, camvid, write_dataset

from pipelines.inference.translate import Translator
from pipelines.preprocessing import Preprocessing, eval_geometry, to_tensor
from pipelines.registry.scoring import eval_loader_config
from pipelines.training.loader import make_eval_loader
from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint

MODES = ["resize_and_crop", "crop", "scale_width_and_crop", "none"]


def stored_inputs(root: str, split: str) -> dict[str, bytes]:
    """key → the input image bytes exactly as stored in the split's shards."""
    found = {}
    for shard in sorted(Path(root, "shards").rglob(f"{split}-*.tar")):
        with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as tar:
            for member in tar.getmembers():
                if ".input." in member.name:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    found[member.name.split(".")[0]] = extracted.read()
    return found


@pytest.mark.parametrize(
    ("mode", "resolution"), [*((mode, "model") for mode in MODES), ("resize_and_crop", "native")]
)
def test_translate_and_evaluate_feed_identical_tensors(
    mode: str, resolution: str, camvid_dir: Path, tmp_path: Path
) -> None:
    # Real CamVid label maps (64x48, not square, so every mode's geometry differs).
    root = write_dataset(tmp_path / "data", {"val": [camvid(camvid_dir, "val", 3)]}, LABELS_FORMAT)
    prep = Preprocessing(
        input_nc=3,
        output_nc=3,
        direction="AtoB",
        load_size=40,
        crop_size=32,
        preprocess=mode,  # type: ignore[arg-type]
        input_is_label_map=True,
    )
    checkpoint = tmp_path / "checkpoint.pt"
    step = TrainingStep(Pix2PixConfig(netG="unet", unet_downs=5, ngf=8, ndf=8))
    save_checkpoint(checkpoint, step, extra={"preprocessing": prep.to_dict()})
    translator = Translator(
        {
            "model_uri": str(checkpoint),
            "input": root,
            "output": str(tmp_path / "out"),
            "resolution": resolution,
        }
    )

    loader = make_eval_loader(eval_loader_config(prep, root, batch_size=1, resolution=resolution), "val")
    evaluated = {batch["key"][0]: batch["A"][0] for batch in loader}
    served = {key: translator.prepare(data, key)[0] for key, data in stored_inputs(root, "val").items()}

    assert evaluated.keys() == served.keys() and len(served) == 3
    native = mode == "none" or resolution == "native"
    expected_shape = (3, 48, 64) if native else (3, 32, 32)
    for key, tensor in served.items():
        assert tensor.shape == expected_shape
        assert torch.equal(tensor, evaluated[key]), key
        if resolution == "native":  # the stored label map itself: nothing resized, the palette exact
            stored = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(stored_inputs(root, "val")[key], np.uint8), 1), cv2.COLOR_BGR2RGB
            )
            assert torch.equal(tensor, to_tensor(stored))


def test_label_maps_keep_their_palette_and_photos_are_smoothed() -> None:
    labels = np.zeros((48, 64, 3), np.uint8)
    labels[:, 30:] = (128, 64, 128)
    for mode in MODES[:3]:
        out = eval_geometry(labels, mode, 20, nearest=True)
        assert {tuple(c) for c in out.reshape(-1, 3)} <= {(0, 0, 0), (128, 64, 128)}, mode
    smooth = eval_geometry(labels, "resize_and_crop", 20, nearest=False)
    assert len({tuple(c) for c in smooth.reshape(-1, 3)}) > 2  # area interpolation blends the boundary


def test_small_images_are_reflect_padded_not_filled() -> None:
    image = np.arange(10 * 12, dtype=np.uint8).reshape(10, 12)
    out = eval_geometry(image, "crop", 16, nearest=True)
    assert out.shape == (16, 16)
    assert set(np.unique(out)) <= set(np.unique(image))  # every value comes from the image


def test_recorded_preprocessing_round_trips_and_old_records_fail_clearly() -> None:
    prep = Preprocessing(1, 3, "AtoB", 286, 256, "resize_and_crop", False, "canny", "abc", "runs/d")
    assert Preprocessing.from_dict({**prep.to_dict(), "added_later": 1}) == prep
    with pytest.raises(ValueError, match="lacks crop_size"):
        Preprocessing.from_dict({k: v for k, v in prep.to_dict().items() if k != "crop_size"})


def test_plainly_wrong_inputs_are_named_before_translation(camvid_dir: Path) -> None:
    """A raw class-id mask given to a labels model and a photo given to an edges model would translate into
    confident nonsense: `input_mismatch` names them (translate quarantines them); the right inputs pass."""
    from pipelines.dataset.derive import Palette, canny_edges, colorize_labels
    from pipelines.images import decode_image

    mask_path = sorted((camvid_dir / "train" / "labels").glob("*.png"))[0]
    photo = decode_image(sorted((camvid_dir / "train" / "images").glob("*.jpg"))[0].read_bytes())
    mask = decode_image(mask_path.read_bytes())  # class ids as the camera's annotation tool wrote them
    ids = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    coloured = colorize_labels(ids, Palette.from_classes_json(camvid_dir / "classes.json"))
    edges = canny_edges(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))
    common = {"output_nc": 3, "direction": "AtoB", "load_size": 286, "crop_size": 256, "preprocess": "none"}
    labels = Preprocessing(input_nc=3, input_is_label_map=True, builder="labels", **common)  # type: ignore[arg-type]
    canny = Preprocessing(input_nc=1, input_is_label_map=False, builder="canny", **common)  # type: ignore[arg-type]

    assert "raw class-id mask" in labels.input_mismatch(mask)
    assert labels.input_mismatch(coloured) == ""
    assert "not photos" in canny.input_mismatch(photo)
    assert canny.input_mismatch(np.repeat(edges[..., None], 3, axis=2)) == ""
    assert canny.input_mismatch(edges) == ""
    photo_to_edges = dataclasses.replace(canny, input_nc=3, direction="BtoA")
    assert photo_to_edges.input_mismatch(photo) == ""  # that direction takes photos


def test_raw_class_ids_are_coloured_with_the_recorded_palette_and_remap(camvid_dir: Path) -> None:
    """`p2p translate --class-ids`: a CamVid mask as shipped, coloured as the dataset build coloured it."""
    import json

    from pipelines.config import ConfigError
    from pipelines.dataset.derive import Palette, colorize_labels
    from pipelines.images import decode_label_mask
    from pipelines.inference.translate import TranslateConfig, colour_class_ids

    palette = Palette.from_classes_json(camvid_dir / "classes.json")
    mask = decode_label_mask(next((camvid_dir / "val" / "labels").glob("*.png")).read_bytes())
    recorded = Preprocessing(
        3,
        3,
        "AtoB",
        72,
        64,
        "resize_and_crop",
        True,
        "labels",
        palette=json.loads(json.dumps(palette.to_dict())),
    )
    assert np.array_equal(colour_class_ids(mask, recorded), colorize_labels(mask, palette))
    remapped = dataclasses.replace(recorded, label_remap={"1": 2})  # as recorded: JSON keys are strings
    assert np.array_equal(colour_class_ids(mask, remapped), colorize_labels(mask, palette, {1: 2}))
    with pytest.raises(ConfigError, match="a dataset's inputs are coloured already"):
        TranslateConfig("m", "ds", "out", split="val", class_ids=True).validate()
