"""Generator inference: from a checkpoint (or a generator-only weights file) to translated images.

A generator file holds the config and the generator's tensors only; like a training checkpoint it loads
with `torch.load(weights_only=True)`, so reading it never runs code that came with it.

Translating at an image's own size (`translate_native`). The generators are fully convolutional, so a
model trained on crop_size × crop_size crops runs on any size its downsamplings divide: a U-Net with n
downsamplings takes sides that are multiples of 2**n (unet_256: 256, unet_128: 128, unet: 2**unet_downs),
a ResNet generator multiples of 4 (`pix2pix.networks.size_factor`). The contract, for an N×C×H×W batch
in [-1, 1] of any H and W:

1. The batch is reflect-padded, split evenly between both sides, to the next multiple of that factor.
   Reflection copies pixels of the image, so a colour-coded label map keeps its palette (a constant fill
   would invent a colour, a resize would blend neighbours). A pad longer than the side reflects again.
2. If the padded image is larger than `tile_size` (0: never tile), it is translated in tiles of
   `tile_size` (rounded down to the factor) overlapping by at least `tile_overlap` pixels. Tile origins lie
   on multiples of the factor where the overlap allows, so a tile sees the same strided-convolution phase
   as the whole image. Across each overlap the two tiles are cross-faded (`blend_ramp`): the quarter next
   to a tile's own border, where its zero-padded edge shows most, is left to the neighbour, the middle half
   fades with a raised cosine, and the two weights sum to 1, so there is no seam. Peak memory is one
   generator call on `tiles_per_call` tiles plus the full-size output, instead of one call on the whole
   image.
3. The output is cropped back to N×C_out×H×W, the input's own size. Without padding or tiling the result is
   exactly `generator(images)`.

What tiling changes. With batch norm in eval mode (the paper's generator, as `load_generator` returns it)
every layer is a fixed local function, so a tile's output equals the whole image's wherever the tile
border is beyond the generator's effective receptive field. A U-Net's deepest layers see the whole tile,
so that field is wide: tiles should be several times the factor (measured on a 480×360 frame with an
untrained 5-down U-Net: tiles of 256 overlapping by 128 differ from the untiled output by 5e-4 on average,
tiles of 128 by 1e-2, in [-1, 1] units). Instance norm normalises each tile with its own statistics, so
tiles of different content come out with shifted tones that the cross-fade smooths but does not remove:
prefer no tiling, or large tiles, for instance-norm models. And even untiled, a model run at the native
size sees content at another scale than it was trained on when its training resized the images (CamVid's
480×360 frames resized to 286 show objects at about 0.6-0.8 of their native size).

The generator is called as it is (train or eval mode, dropout as set by the caller), under `no_grad`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from copy import deepcopy as copy_module
from typing import IO, Any

import torch
from torch import nn
from torch.nn import functional as F

from pix2pix.checkpoint import FORMAT_VERSION, load_checkpoint
from pix2pix.config import Pix2PixConfig
from pix2pix.networks import build_generator


def load_generator(
    source: str | os.PathLike[str] | IO[bytes] | bytes, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Pix2PixConfig]:
    """The generator of a training checkpoint or generator file, in eval mode, with its config."""
    return generator_from_state(load_checkpoint(source, map_location=device), device)


def generator_from_state(
    state: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[nn.Module, Pix2PixConfig]:
    """The same from a loaded checkpoint's state (`load_checkpoint`), for a caller that reads it too."""
    config = Pix2PixConfig.from_dict(state["config"])
    generator = build_generator(config).to(device)
    generator.load_state_dict(state["G"])
    return generator.eval(), config


def save_generator(
    target: str | os.PathLike[str] | IO[bytes], generator: nn.Module, config: Pix2PixConfig
) -> None:
    """The generator alone (config + tensors), readable by `load_generator`."""
    state = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "G": generator.state_dict()}
    torch.save(state, target)


def set_dropout(module: nn.Module, active: bool) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train(active)


def with_per_image_norm(generator: nn.Module) -> nn.Module:
    """A copy of `generator` whose batch-norm layers normalise each image by its own statistics, with the
    learnt scale and shift: the batch-norm half of the paper's test-time protocol ("batch normalization
    using the statistics of the test batch", at batch size 1). The other half, dropout kept on at test
    time (as the authors' test.py without --eval also does), is not part of it: dropout stays as the
    caller sets it (`translate(keep_dropout=...)`; the project's evaluation runs with it off). A model
    trained at one image per batch-norm batch only ever saw these statistics, never the running averages
    that eval mode uses; unlike train mode it updates no running statistics and gives every image of a
    batch the result it would get alone."""
    copy = copy_module(generator)
    for parent in copy.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d | nn.SyncBatchNorm):
                norm = nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
    return copy


@torch.inference_mode()
def translate(generator: nn.Module, images: torch.Tensor, keep_dropout: bool = False) -> torch.Tensor:
    """G(x) for a batch in [-1, 1]. Eval mode (running batch-norm statistics); `keep_dropout=True` keeps
    dropout sampling, the paper's test-time noise, so repeated calls give different outputs."""
    was_training = generator.training
    generator.eval()
    set_dropout(generator, keep_dropout)
    try:
        device = next(generator.parameters()).device
        return generator(images.to(device))
    finally:
        generator.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# At the image's own size: pad to the factor, tile with blended overlaps, crop back (module docstring)
# ----------------------------------------------------------------------------------------------------------

DEFAULT_TILE_OVERLAP = 64
Padding = tuple[int, int, int, int]  # top, bottom, left, right


def reflect_pad(images: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Reflect-pads N×C×H×W by (top, bottom, left, right), reflecting again where a pad exceeds the side
    (a side of one pixel has nothing to reflect: it is repeated)."""
    top, bottom, left, right = padding
    return _reflect_axis(_reflect_axis(images, left, right, -1), top, bottom, -2)


def _reflect_axis(images: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    while before or after:
        size = images.shape[dim]
        mode = "reflect" if size > 1 else "replicate"
        b, a = (min(before, size - 1), min(after, size - 1)) if size > 1 else (before, after)
        images = F.pad(images, [b, a, 0, 0] if dim == -1 else [0, 0, b, a], mode=mode)
        before, after = before - b, after - a
    return images


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Padding]:
    """N×C×H×W reflect-padded to the next multiple of `multiple` per side, and the padding to crop off."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    height, width = images.shape[-2:]
    pad_y, pad_x = -height % multiple, -width % multiple
    padding = (pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2)
    return reflect_pad(images, padding), padding


def crop_padding(images: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Undoes `pad_to_multiple` on an output of the padded size."""
    top, bottom, left, right = padding
    height, width = images.shape[-2:]
    return images[..., top : height - bottom, left : width - right]


def tile_size_for(tile_size: int, tile_overlap: int, multiple: int) -> int:
    """`tile_size` rounded down to a side the generator takes (0 stays 0: no tiling); ValueError for a tile
    the generator cannot take or an overlap that leaves no step."""
    if tile_size == 0:
        return 0
    if tile_size < multiple:
        raise ValueError(
            f"tile_size {tile_size} is smaller than the {multiple} px this generator's sides must divide "
            f"by: use 0 (no tiling) or at least {multiple}"
        )
    tile = tile_size // multiple * multiple
    if not 0 <= tile_overlap < tile:
        raise ValueError(
            f"tile_overlap must be >= 0 and smaller than the tile ({tile} px for this generator), "
            f"got {tile_overlap}"
        )
    return tile


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Origins of tiles of `tile` pixels covering `length`, neighbours overlapping by at least `overlap`.

    The step is `tile - overlap` rounded down to a multiple of `align` (halved while that leaves no step),
    and the last tile ends at `length`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be >= 0 and smaller than the tile ({tile} px), got {overlap}")
    step, grid = tile - overlap, max(1, align)
    while grid > 1 and step < grid:
        grid //= 2
    step = step // grid * grid
    return sorted({*range(0, length - tile, step), length - tile})


def blend_ramp(starts: list[int], index: int, tile: int) -> torch.Tensor:
    """1-D weights of tile `index` of tiles at `starts`, 1 where no neighbour overlaps it. Across an overlap
    of L pixels with a neighbour, the outer L/4 (next to this tile's border, where its zero-padded edge
    shows most) weigh 0, the middle L/2 ramp up with a raised cosine, and the inner L/4 weigh 1; the
    neighbour's ramp mirrors it, so the two sum to 1 (sin² + cos²) everywhere in the overlap."""
    weight = torch.ones(tile, dtype=torch.float64)
    if index > 0:
        overlap = starts[index - 1] + tile - starts[index]
        weight[:overlap] *= _rising(overlap)
    if index < len(starts) - 1:
        overlap = starts[index] + tile - starts[index + 1]
        weight[tile - overlap :] *= _rising(overlap).flip(0)
    return weight


def _rising(length: int) -> torch.Tensor:
    """0 over the first quarter, a raised-cosine rise over the middle half, 1 over the last quarter."""
    margin = length // 4
    ramp = length - 2 * margin
    rise = torch.sin((torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp * (math.pi / 2)).square()
    return torch.cat(
        [torch.zeros(margin, dtype=torch.float64), rise, torch.ones(margin, dtype=torch.float64)]
    )


@torch.no_grad()
def translate_native(
    generator: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    multiple: int,
    tile_size: int = 0,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    tiles_per_call: int = 0,
) -> torch.Tensor:
    """G(images) at their own H×W (module docstring): pad to `multiple`, tile above `tile_size`, crop back.

    `images` must be on the generator's device; `tiles_per_call` bounds how many tiles go through one
    generator call (0: one tile position for the whole batch per call)."""
    padded, padding = pad_to_multiple(images, multiple)
    height, width = padded.shape[-2:]
    tile = tile_size_for(tile_size, tile_overlap, multiple)
    tile_h, tile_w = (min(tile, height), min(tile, width)) if tile else (height, width)
    if (tile_h, tile_w) == (height, width):
        return crop_padding(generator(padded), padding)
    ys = tile_starts(height, tile_h, tile_overlap, multiple)
    xs = tile_starts(width, tile_w, tile_overlap, multiple)
    ramps_y = [blend_ramp(ys, i, tile_h) for i in range(len(ys))]
    ramps_x = [blend_ramp(xs, j, tile_w) for j in range(len(xs))]
    positions = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    n = images.shape[0]
    per_call = max(1, tiles_per_call // n) if tiles_per_call else 1
    out: torch.Tensor | None = None
    total = torch.zeros(height, width, device=images.device)
    for first in range(0, len(positions), per_call):
        chunk = positions[first : first + per_call]
        tiles = [padded[..., ys[i] : ys[i] + tile_h, xs[j] : xs[j] + tile_w] for i, j in chunk]
        results = generator(torch.cat(tiles)).split(n)
        if out is None:
            out = results[0].new_zeros(n, results[0].shape[1], height, width, dtype=torch.float32)
        for (i, j), result in zip(chunk, results, strict=True):
            weight = torch.outer(ramps_y[i], ramps_x[j]).to(result.device, torch.float32)
            window = (slice(ys[i], ys[i] + tile_h), slice(xs[j], xs[j] + tile_w))
            out[(..., *window)] += result.float() * weight
            total[window] += weight
    assert out is not None and bool(total.min() > 0), "every pixel is covered by a tile of positive weight"
    return crop_padding((out / total).to(results[0].dtype), padding)
