"""Reading the image files of the image datasets, with a decode check at build time.

An HTML error page or random bytes saved as `.jpg` must never reach training as an "image": each
file is decoded once (Pillow) when the dataset is built. A bad one is an error naming the file and
the record, or, with `data.bad_images="drop"`, the record is dropped and counted.
"""

from __future__ import annotations

import io

from etils import epath

from data.records import DataError

BAD_IMAGE_POLICIES = ("error", "drop")


def check_image(data: bytes, what: str) -> None:
    """Raises DataError unless `data` decodes as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{what}: not a decodable image ({' '.join(str(e).split())})") from None


def read_image(folder, name, where: str) -> bytes:
    """The bytes of image `name` (a path relative to `folder`), decode-checked; `where` = file:line of the record."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: image file name must be a non-empty string, got {name!r}")
    path = epath.Path(folder) / name
    if not path.is_file():
        raise DataError(f"{where}: image {name} not found under {folder}")
    data = path.read_bytes()
    check_image(data, f"{where}: image {path}")
    return data
