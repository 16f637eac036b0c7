"""torchvision.transforms, only what diffusers' textual_inversion.py and train_dreambooth_lora.py use.

Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize and InterpolationMode,
for PIL images in (and tensors from ToTensor on), with torchvision's semantics (torchvision 0.2x,
transforms v1 on PIL images):

- Resize(int) scales the shorter side to ``size`` keeping the aspect ratio (int(size * long / short) for
  the longer side), Resize((h, w)) to exactly that; an image already at the output size is returned as is;
  PIL's resampling filter from the InterpolationMode.
- CenterCrop takes top = int(round((h - th) / 2)), left = int(round((w - tw) / 2)) and pads with zeros
  where the image is smaller than the crop; RandomCrop draws top and left with torch.randint (no draw when
  the image already has the crop's size), raising when the image is smaller (no padding options).
- RandomHorizontalFlip flips when torch.rand(1) < p (one draw per call).
- ToTensor gives a CHW float tensor in [0, 1] for 8-bit images (uint8 / 255), unscaled for other modes.
- Normalize subtracts mean and divides by std per channel (broadcast: [0.5] applies to every channel).

Random draws use torch's global generator, as torchvision's do, so a seeded script sees the same crops
and flips it would with torchvision.
"""
from __future__ import annotations

import numbers
from enum import Enum
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize",
           "InterpolationMode"]


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_MODES = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _pil(img) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"this torchvision stand-in transforms PIL images only, got {type(img).__name__}")
    return img


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    if isinstance(size, Sequence) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{name}: please provide only two dimensions (h, w) for size.")


def _resized_size(h: int, w: int, size, max_size: int | None) -> list[int]:
    """torchvision.transforms.functional._compute_resized_output_size: [new_h, new_w]."""
    if isinstance(size, numbers.Number) or len(size) == 1:
        requested = int(size if isinstance(size, numbers.Number) else size[0])
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None:
            if max_size <= requested:
                raise ValueError(f"max_size = {max_size} must be strictly greater than the requested size "
                                 f"for the smaller edge size = {size}")
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return [new_h, new_w]
    if max_size is not None:
        raise ValueError("max_size should only be passed if size specifies the length of the smaller edge")
    return [int(size[0]), int(size[1])]


def _crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    # PIL fills the part of a box outside the image with zeros, as torchvision's pad-then-crop does
    return img.crop((left, top, left + width, top + height))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        body = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


class Resize(torch.nn.Module):
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        super().__init__()
        if not isinstance(size, (int, Sequence)):
            raise TypeError(f"Size should be int or sequence. Got {type(size)}")
        if isinstance(size, Sequence) and len(size) not in (1, 2):
            raise ValueError("If size is a sequence, it should have 1 or 2 values")
        if isinstance(interpolation, int):  # torchvision still takes PIL's integer constants
            interpolation = {int(v): k for k, v in reversed(list(_PIL_MODES.items()))}[interpolation]
        if not isinstance(interpolation, InterpolationMode):
            raise TypeError("Argument interpolation should be a InterpolationMode or a corresponding Pillow integer "
                            "constant")
        self.size, self.interpolation, self.max_size, self.antialias = size, interpolation, max_size, antialias

    def forward(self, img):
        img = _pil(img)
        w, h = img.size
        new_h, new_w = _resized_size(h, w, self.size, self.max_size)
        if [h, w] == [new_h, new_w]:
            return img
        return img.resize((new_w, new_h), _PIL_MODES[self.interpolation])

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation.value}, max_size={self.max_size}, " \
               f"antialias={self.antialias}"


class CenterCrop(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = _pair(size, "CenterCrop")

    def forward(self, img):
        img = _pil(img)
        w, h = img.size
        th, tw = self.size
        if tw > w or th > h:  # torchvision pads (zeros) to at least the crop size, evenly, then crops
            pl, pt = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
            pr, pb = (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0
            padded = Image.new(img.mode, (w + pl + pr, h + pt + pb))
            padded.paste(img, (pl, pt))
            img = padded
            w, h = img.size
            if w == tw and h == th:
                return img
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return _crop(img, top, left, th, tw)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class RandomCrop(torch.nn.Module):
    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        super().__init__()
        if padding is not None or pad_if_needed:
            raise NotImplementedError("this torchvision stand-in's RandomCrop does not pad")
        self.size = _pair(size, "RandomCrop")

    @staticmethod
    def get_params(img, output_size):
        w, h = _pil(img).size
        th, tw = output_size
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
        if w == tw and h == th:
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw

    def forward(self, img):
        i, j, h, w = self.get_params(img, self.size)
        return _crop(img, i, j, h, w)

    def extra_repr(self) -> str:
        return f"size={self.size}, padding=None"


class RandomHorizontalFlip(torch.nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        if torch.rand(1) < self.p:
            return _pil(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ToTensor:
    def __call__(self, pic):
        if isinstance(pic, np.ndarray):
            if pic.ndim == 2:
                pic = pic[:, :, None]
            t = torch.from_numpy(pic.transpose((2, 0, 1))).contiguous()
            return t.to(torch.get_default_dtype()).div(255) if t.dtype == torch.uint8 else t
        pic = _pil(pic)
        mode_to_dtype = {"I": np.int32, "I;16": np.int16, "F": np.float32}
        arr = np.array(pic, mode_to_dtype.get(pic.mode, np.uint8), copy=True)
        if pic.mode == "1":
            arr = 255 * arr
        t = torch.from_numpy(arr).view(pic.size[1], pic.size[0], len(pic.getbands())).permute(2, 0, 1).contiguous()
        return t.to(torch.get_default_dtype()).div(255) if t.dtype == torch.uint8 else t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace=False):
        super().__init__()
        self.mean, self.std, self.inplace = mean, std, inplace

    def forward(self, tensor):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"Input tensor should be a float tensor. Got {getattr(tensor, 'dtype', type(tensor))}.")
        if tensor.ndim < 3:
            raise ValueError(f"Expected tensor to be a tensor image of size (..., C, H, W). Got {tuple(tensor.shape)}.")
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if (std == 0).any():
            raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}, leading to division by zero.")
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
