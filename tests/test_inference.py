"""Translating at an image's own size (`pix2pix.inference.translate_native`): reflect-pad to the sizes the
generator takes, tile with cross-faded overlaps, crop back. Real generators, a real CamVid frame."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import pytest
import torch
from torch import nn

from pix2pix import Pix2PixConfig, build_generator
from pix2pix.inference import (
    blend_ramp,
    crop_padding,
    pad_to_multiple,
    tile_size_for,
    tile_starts,
    translate_native,
    with_per_image_norm,
)
from pix2pix.networks import size_factor


def camvid_frame(camvid_dir: Path) -> torch.Tensor:
    """A real 480×360 CamVid photo as 1×3×360×480 in [-1, 1]."""
    path = sorted((camvid_dir / "val" / "images").glob("*.jpg"))[0]
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1)


def batchnorm_unet(frame: torch.Tensor, downs: int = 5) -> nn.Module:
    """A small paper U-Net (batch norm, no dropout) whose running statistics come from real crops of
    `frame`, in eval mode: what `load_generator` hands to inference."""
    torch.manual_seed(0)
    generator = build_generator(Pix2PixConfig(netG="unet", unet_downs=downs, ngf=8, use_dropout=False))
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the passes below
    with torch.no_grad():
        for top, left in ((0, 0), (104, 160), (104, 224), (40, 96)):
            generator(frame[..., top : top + 256, left : left + 256])
    return generator.eval()


@pytest.mark.parametrize(
    ("height", "width", "multiple"), [(1, 1, 32), (7, 13, 4), (37, 53, 32), (360, 480, 256)]
)
def test_pad_and_crop_round_trip_odd_sizes(height: int, width: int, multiple: int) -> None:
    images = torch.arange(2 * 3 * height * width, dtype=torch.float32).reshape(2, 3, height, width)
    padded, padding = pad_to_multiple(images, multiple)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert padded.shape[-2] - height < multiple and padded.shape[-1] - width < multiple
    top, bottom, left, right = padding
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1  # centred
    assert torch.equal(crop_padding(padded, padding), images)
    # Reflection only copies pixels of the image (a label map keeps its palette), even when a pad is longer
    # than the side (1 px padded to 32, 37 px to 64).
    assert set(padded.unique().tolist()) <= set(images.unique().tolist())


def test_native_output_has_the_input_size_and_is_the_generator_where_no_pad_is_needed() -> None:
    torch.manual_seed(0)
    config = Pix2PixConfig(netG="unet", unet_downs=5, ngf=8, input_nc=1, output_nc=3)
    generator = build_generator(config).eval()
    factor = size_factor(config)
    assert factor == 32
    odd = torch.rand(2, 1, 37, 53) * 2 - 1
    assert translate_native(generator, odd, factor).shape == (2, 3, 37, 53)
    valid = torch.rand(1, 1, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(translate_native(generator, valid, factor), generator(valid))


def test_tiles_cover_the_image_on_the_grid_and_their_weights_sum_to_one() -> None:
    for length, tile, overlap, align in [
        (512, 256, 64, 256),
        (384, 128, 32, 32),
        (100, 40, 30, 1),
        (97, 32, 31, 4),
    ]:
        starts = tile_starts(length, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] == length - tile
        steps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(tile - step >= overlap for step in steps)  # at least the overlap asked for
        if tile - overlap >= align:
            assert all(s % align == 0 for s in starts[:-1])  # on the generator's downsampling grid
        total = torch.zeros(length, dtype=torch.float64)
        for index, start in enumerate(starts):
            total[start : start + tile] += blend_ramp(starts, index, tile)
        if all(tile - step <= step for step in steps):  # at most two tiles over any pixel
            assert torch.allclose(total, torch.ones(length, dtype=torch.float64))
        assert bool(total.min() > 0)
    assert tile_starts(200, 256, 64, 256) == [0]


def test_tiled_equals_untiled_for_a_pixelwise_generator() -> None:
    """With no spatial context, any tiling must give the untiled output exactly: the blending adds up."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Tanh())
    images = torch.rand(2, 3, 150, 210) * 2 - 1
    whole = translate_native(generator, images, 1)
    for tile, overlap in ((64, 16), (50, 40), (100, 0)):
        tiled = translate_native(generator, images, 1, tile, overlap, tiles_per_call=3)
        assert tiled.shape == images.shape
        assert torch.allclose(tiled, whole, atol=1e-6), (tile, overlap)


def test_tiled_is_close_to_untiled_for_an_eval_mode_batchnorm_unet(camvid_dir: Path) -> None:
    """The paper's generator in eval mode is local (running statistics): tiles of several times its size
    factor, cross-faded over their overlaps, give the untiled output up to the tile borders' small reach."""
    frame = camvid_frame(camvid_dir)
    generator = batchnorm_unet(frame)
    whole = translate_native(generator, frame, 32)
    assert whole.shape == (1, 3, 360, 480) and float(whole.std()) > 0.05  # not a flat output
    tiled = translate_native(generator, frame, 32, tile_size=256, tile_overlap=128, tiles_per_call=4)
    difference = (tiled - whole).abs()
    assert float(difference.mean()) < 2e-3 and float(difference.max()) < 0.1
    # Small tiles see less of the frame, so they differ more; the cross-fade still leaves no seam: the step
    # from one column to the next is nowhere larger than in the untiled output (a hard cut between these
    # tiles adds 0.02 at a tile border).
    small = translate_native(generator, frame, 32, tile_size=128, tile_overlap=64)
    assert float((small - whole).abs().mean()) < 0.03

    def column_steps(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))

    assert float((column_steps(small) - column_steps(whole)).max()) < 0.005


def test_tiles_the_generator_cannot_take_are_refused() -> None:
    assert tile_size_for(0, 64, 256) == 0 and tile_size_for(600, 64, 256) == 512
    with pytest.raises(ValueError, match="smaller than the 256 px"):
        tile_size_for(128, 16, 256)
    with pytest.raises(ValueError, match="tile_overlap must be >= 0 and smaller than the tile"):
        tile_size_for(300, 256, 256)


def test_per_image_norm_is_train_mode_batch_norm_at_batch_one_without_touching_the_model() -> None:
    torch.manual_seed(0)
    generator = build_generator(Pix2PixConfig(netG="unet_128", ngf=8, use_dropout=False)).train()
    images = torch.rand(3, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        generator(images)  # running statistics that differ from any single image's
        before = {k: v.clone() for k, v in generator.state_dict().items()}
        one_at_a_time = torch.cat([generator(images[i : i + 1]) for i in range(3)])  # the paper's test mode
        generator.load_state_dict(before)
        per_image = with_per_image_norm(generator).eval()
        assert torch.allclose(per_image(images), one_at_a_time, atol=1e-5)  # a batch: each image alone
        assert not torch.allclose(generator.eval()(images), one_at_a_time, atol=1e-2)  # running averages
        per_image(images)
    after = generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is left as it was
    assert not any(isinstance(m, nn.BatchNorm2d) for m in per_image.modules())


def test_translate_pins_an_alias_or_latest_to_the_version_it_names_now(tmp_path: Path) -> None:
    """Every actor loads the model itself: `@champion` moved by a promotion mid-job would give one output
    folder two models' images, so the driver resolves the version once."""
    from mlflow import MlflowClient

    from pipelines.inference.translate import pinned_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("m", "champion", "1")
    assert pinned_uri("models:/m@champion", uri) == "models:/m/1"
    assert pinned_uri("models:/m", uri) == pinned_uri("models:/m/latest", uri) == "models:/m/2"
    for unchanged in ("models:/m/1", "runs:/0123abcd/generator", str(tmp_path / "checkpoint.pt")):
        assert pinned_uri(unchanged, uri) == unchanged
