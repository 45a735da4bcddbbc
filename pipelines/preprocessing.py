"""How a model's inputs are prepared: recorded once at training time, applied the same way everywhere after.

`Preprocessing` is written into every checkpoint (`extra["preprocessing"]`) and into the MLflow model's
metadata (`p2p`). Training validation (through the loader's eval transform), `p2p evaluate` and
`p2p translate` all prepare images with `eval_geometry` and `to_tensor` below, so a model is scored on
exactly the tensors it is later served with. Training adds the random jitter (resize to `load_size`,
random crop, flip) on top, in the loader; evaluation and serving never do.

Eval geometry per `preprocess` mode (what the paper's test phase does, without randomness):
- resize_and_crop: resize to crop_size × crop_size;
- crop: centre crop of crop_size;
- scale_width_and_crop: scale the width to crop_size keeping the aspect ratio, then centre crop;
- none: the image as it is.
Images smaller than the crop are reflect-padded (a constant would invent a colour that may not be in a
label map's palette). Label maps are resized with nearest neighbour; photos with area interpolation when
shrinking and bilinear when enlarging.

Resolution (`p2p translate` / `p2p evaluate --resolution`): `model` (the default) applies the eval geometry
above, the size the model was trained at; `native` keeps each image at its own size (channels are still
converted, nothing is resized or cropped, so a label map reaches the generator pixel-exact), and the
generator pads it to a size it takes and crops its output back (`pix2pix.inference.translate_native`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch

PreprocessMode = Literal["resize_and_crop", "crop", "scale_width_and_crop", "none"]
Direction = Literal["AtoB", "BtoA"]
Resolution = Literal["model", "native"]


@dataclass(frozen=True)
class Preprocessing:
    input_nc: int  # generator input channels: 1 (edges, gray) or 3
    output_nc: int
    direction: Direction  # AtoB: the dataset's input → target; BtoA: target → input
    load_size: int  # training only: resize target before the random crop
    crop_size: int  # the size the model was trained at
    preprocess: PreprocessMode
    input_is_label_map: bool  # the input is a colour-coded label map: nearest-neighbour resizing only
    builder: str = ""  # how the dataset derived its inputs (none, labels, canny, hed, grayscale)
    dataset_build_id: str = ""
    manifest: str = ""  # the dataset the model was trained on (promotion's default evaluation data)
    # A labels model's colours (`Palette.to_dict`) and the class-id remap its dataset applied first: what
    # `p2p translate --class-ids` colours raw masks with, as the build did. None: not recorded (another
    # builder, or a model trained before they were).
    palette: dict[str, Any] | None = None
    label_remap: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """From a checkpoint's or a model's recorded dict; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        absent = [name for name in required if name not in values]
        if absent:
            raise ValueError(
                f"the recorded preprocessing lacks {', '.join(absent)}: not written by p2p train"
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def input_mismatch(self, image: np.ndarray) -> str:
        """Why a decoded RGB input is plainly not what this model was trained on, or "" when it may be.

        Two mistakes that would otherwise translate into confident nonsense: a raw class-id mask (gray,
        values 0..a few dozen) given to a labels model, which was trained on masks coloured with its
        dataset's palette; and a colour photo given to an edges model (Canny/HED inputs are gray). A gray
        photo given to an edges model is not caught (it cannot be told from a soft HED map this simply)."""
        sample = image[::4, ::4].astype(np.int16)  # a sixteenth of the pixels says it as well
        gray = sample.ndim == 2 or bool((sample == sample[..., :1]).all())
        if self.input_is_label_map and gray and int(sample.max()) < 64:
            how = (
                "--class-ids colours such masks with it"
                if self.palette
                else "as `p2p dataset build --builder labels` writes"
            )
            return (
                f"a gray map of values 0-{int(sample.max())}, a raw class-id mask: this model takes label "
                f"maps coloured with its dataset's palette ({how})"
            )
        if self.builder not in ("canny", "hed") or self.direction != "AtoB":
            return ""
        # Edge maps are gray; photos have colour (a mean channel difference of 3-10 on CamVid's dull street
        # scenes). Mid-tones tell nothing: soft HED maps have 30-65% of their pixels between 32 and 223.
        if not gray and float(np.abs(np.diff(sample, axis=-1)).mean()) > 2:
            return (
                f"a colour photo: this model takes {self.builder} edge maps (as `p2p dataset build --builder "
                f"{self.builder}` derives from photos), not photos"
            )
        return ""

    def prepare_input(self, image: np.ndarray, resolution: Resolution = "model") -> np.ndarray:
        """A decoded HxWx3 RGB (or HxW / HxWx1 gray) uint8 input → HxWxC uint8 at the model's geometry
        (`resolution="model"`) or at its own size (`"native"`)."""
        if self.input_nc == 1 and image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        elif self.input_nc == 3 and (image.ndim == 2 or image.shape[2] == 1):
            image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
        preprocess = "none" if resolution == "native" else self.preprocess
        return eval_geometry(image, preprocess, self.crop_size, nearest=self.input_is_label_map)

    def input_tensor(self, image: np.ndarray, resolution: Resolution = "model") -> torch.Tensor:
        """A decoded input image → the CxHxW float tensor in [-1, 1] that the generator is fed."""
        return to_tensor(self.prepare_input(image, resolution))


def eval_geometry(image: np.ndarray, preprocess: str, crop_size: int, nearest: bool) -> np.ndarray:
    """The deterministic resize / crop of the module docstring; keeps a trailing channel axis if given."""
    channels = None if image.ndim == 2 else image.shape[2]
    height, width = image.shape[:2]
    if preprocess == "resize_and_crop":
        image = _resize(image, crop_size, crop_size, nearest)
    elif preprocess == "scale_width_and_crop":
        image = _resize(image, crop_size, max(1, round(height * crop_size / width)), nearest)
    elif preprocess not in ("crop", "none"):
        raise ValueError(f"unknown preprocess {preprocess!r}")
    if preprocess != "none":
        image = _centre_crop(image, crop_size)
    if channels is not None and image.ndim == 2:
        image = image[:, :, None]  # OpenCV drops a single channel axis
    return image


def _resize(image: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    if nearest:
        interpolation = cv2.INTER_NEAREST
    elif width < image.shape[1] and height < image.shape[0]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    pad_y, pad_x = max(0, size - height), max(0, size - width)
    if pad_y or pad_x:
        image = cv2.copyMakeBorder(
            image, pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2, cv2.BORDER_REFLECT_101
        )
        height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWxC (or HxW) uint8 → CxHxW float32 in [-1, 1] (x / 127.5 - 1)."""
    chw = np.ascontiguousarray(image.reshape(image.shape[0], image.shape[1], -1).transpose(2, 0, 1))
    return torch.from_numpy(chw).float().div_(127.5).sub_(1.0)


def to_image(output: torch.Tensor) -> np.ndarray:
    """A generator output CxHxW in [-1, 1] → HxWxC uint8 (HxW for one channel)."""
    image = ((output.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).cpu()
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
