"""Images -> the vision tower's pixels, as the checkpoint's `preprocessor_config.json` says, on the host.

The steps and their order are those of Hugging Face's image processors (SigLIP: resize to
height x width; CLIP: resize the shortest edge, centre-crop): convert to RGB (transparency composited
onto white), resize with PIL (bicubic unless `resample` says otherwise), centre-crop, rescale
(x 1/255), normalise ((x - mean) / std). Output: float32 [height, width, 3], channels last (the
tower's layout). tests/model/test_llava.py checks it against transformers' processor on a real image.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from data.records import DataError


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    height: int | None = None  # resize to height x width …
    width: int | None = None
    shortest_edge: int | None = None  # … or the shortest edge to this, keeping the aspect ratio
    crop: tuple[int, int] | None = None  # centre crop (height, width) after the resize
    resample: int = 3  # PIL's code: 3 = bicubic
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_normalize: bool = True

    @classmethod
    def from_config(cls, path: str) -> ImageProcessor:
        """From a `preprocessor_config.json` (SigLIP or CLIP image processor)."""
        try:
            with open(path) as f:
                c = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: missing (the checkpoint's image processor settings)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        size = c.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = c.get("crop_size") if c.get("do_center_crop") else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not (("height" in size and "width" in size) or "shortest_edge" in size):
            raise DataError(f"{path}: size {size!r} needs height and width, or shortest_edge")
        return cls(
            height=size.get("height"),
            width=size.get("width"),
            shortest_edge=size.get("shortest_edge"),
            crop=(crop["height"], crop["width"]) if crop else None,
            resample=int(c.get("resample", 3)),
            rescale_factor=float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else 1.0,
            mean=tuple(c.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(c.get("image_std", (0.5, 0.5, 0.5))),
            do_normalize=bool(c.get("do_normalize", True)),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.height:
            return self.height, self.width
        return self.shortest_edge, self.shortest_edge

    def __call__(self, image, what: str = "image") -> np.ndarray:
        """PIL image or encoded bytes -> float32 [height, width, 3]; `what` names it in errors."""
        from PIL import Image

        if isinstance(image, (bytes, bytearray)):
            try:
                image = Image.open(io.BytesIO(image))
                image.load()
            except Exception as e:  # noqa: BLE001 — PIL raises many kinds for a corrupt file
                raise DataError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None
        image = to_rgb(image)
        w, h = image.size
        if self.shortest_edge:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL: (width, height)
        else:
            size = (self.width, self.height)
        image = image.resize(size, resample=self.resample)
        x = np.asarray(image)
        if self.crop:
            x = center_crop(x, *self.crop)
        x = x.astype(np.float32) * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.astype(np.float32)


def to_rgb(image):
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> the centre [height, width, C], zero-padded where the image is smaller."""
    h, w = x.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[top : top + height, left : left + width]
    out = np.zeros((max(h, height), max(w, width)) + x.shape[2:], x.dtype)
    oy, ox = max(0, -top), max(0, -left)
    out[oy : oy + h, ox : ox + w] = x
    top, left = max(0, top), max(0, left)
    return out[top : top + height, left : left + width]
