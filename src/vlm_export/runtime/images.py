"""Reading request images safely: bounded before they are decoded in full.

A 32 KB PNG can declare 12000 x 12000 pixels and cost gigabytes once decoded (a "decompression
bomb"); Pillow itself refuses only above ~179 M pixels. So the encoded size is checked first, then
the pixel count from the header alone, and only then is the image decoded. The pixel limit is
derived from the model's input size (every model resizes to it anyway): 64 times its area, and
never below 64 M pixels (8192 x 8192), so an ordinary photo (a 48- or 50-megapixel phone camera's
included) always passes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..contract import ImageTiles
from ..contract.layout import MAX_ASPECT_RATIO
from ..errors import InputError

#: the image processors' backend wherever a build's pixels are made (the build's checks, in process, served):
#: Pillow's, which every environment has - the served image has no torch, so no torchvision, and transformers
#: picks the torchvision one where that is installed, whose pixels differ by a rounding step (up to 1/127 after
#: normalizing, measured on CLIP, SigLIP, Qwen2-VL, Idefics3 and InternVL processors): answers checked at build
#: time would not be the ones served
IMAGE_PROCESSOR_BACKEND = "pil"


def load_image_processor(folder: Path):
    """The image processor saved in ``folder`` (``AutoImageProcessor``), on :data:`IMAGE_PROCESSOR_BACKEND`. Local
    only: a model's or a build's folder is never a hub name (a missing one would otherwise be fetched, with retries)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, backend=IMAGE_PROCESSOR_BACKEND, local_files_only=True)

ImageInput = Union[str, Path, bytes, "PIL.Image.Image"]  # noqa: F821
DEFAULT_MAX_IMAGE_BYTES = 32 << 20
MIN_MAX_PIXELS = 8192 * 8192
INPUT_AREAS = 64


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MIN_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError(f"image limits must be positive, got {self.max_pixels} pixels, {self.max_bytes} bytes")

    @classmethod
    def for_input(cls, height: int, width: int, max_pixels: int | None = None,
                  max_bytes: int | None = None) -> "ImageLimits":
        """Limits for a model whose image input is ``height x width``; explicit values win."""
        derived = max(MIN_MAX_PIXELS, INPUT_AREAS * int(height) * int(width))
        return cls(max_pixels or derived, max_bytes or DEFAULT_MAX_IMAGE_BYTES)

    def check_bytes(self, size: int, what: str = "the image") -> None:
        if size > self.max_bytes:
            raise InputError(f"{what} is {size / 2**20:.1f} MiB encoded; at most {self.max_bytes / 2**20:.0f} MiB "
                             "are accepted (max_image_bytes): send a smaller file")

    def check_pixels(self, width: int, height: int, what: str = "the image") -> None:
        if width * height > self.max_pixels:
            raise InputError(f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} M); at most "
                             f"{self.max_pixels / 1e6:.1f} M pixels are decoded (max_image_pixels): resize it first")
        # few pixels, but a processor that scales the short side up would make a huge one (a 300000x1 strip
        # resized to a 224-pixel short side: 67 G pixels)
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InputError(f"{what} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times as long as it is "
                             "wide; crop or pad it first")


def processed_images(processor, images: "list[ImageInput]", limits: ImageLimits, tiles=None) -> dict:
    """``processor``'s outputs (numpy) for a request's images, each read by ``load_image`` with
    transparency as that processor treats it (``over_white``): what in-process and served
    preprocessing both give. ``tiles``: the layout's ``image_tiles``, whose ``options`` the model's processor
    passes its image processor, and which says whether the images go in as one prompt's (``one_prompt``:
    LLaVA-OneVision's processor tiles an image only where it is its prompt's one)."""
    white = over_white(processor)
    pil = [load_image(image, limits, image_name(k, image, len(images)), white) for k, image in enumerate(images)]
    options = tiles.options if tiles is not None else {}
    one_prompt = tiles is not None and tiles.one_prompt
    return processor(images=[pil] if one_prompt else pil, return_tensors="np", **options)


def image_grids(processor, images: "list[ImageInput]", limits: ImageLimits, tiles: ImageTiles) -> list[tuple[int, int]]:
    """Each image's grid of tiles as a tiling image processor cuts it (``ImageTiles.grids``). Read by preprocessing
    the images, not from their sizes: the processors' ``get_number_of_image_patches`` disagrees with their
    preprocessing on some sizes (Idefics3's: a 334x307 image with a longest edge of 100 and tiles of 32, 3 x 4
    against the 4 x 4 tiles made)."""
    return tiles.grids(processed_images(processor, images, limits, tiles)) if images else []


def over_white(processor) -> bool:
    """Whether transparent pixels are seen over white: an image processor that converts to RGB itself
    (``do_convert_rgb``, on in most) composites them so; one that does not takes only RGB images, which
    Hugging Face's ``load_image`` makes with a plain ``convert("RGB")`` (the colour under the
    transparency), as ours then does."""
    return bool(getattr(processor, "do_convert_rgb", True))


def load_image(src: ImageInput, limits: ImageLimits = ImageLimits(), name: str | None = None, white: bool = True):
    """A PIL RGB image from a path, encoded bytes or a PIL image; InputError (saying what is wrong,
    about the image called ``name``) if it is too large, unreadable or not an image. ``white``:
    transparent pixels over white (``as_rgb``), else as ``convert("RGB")`` leaves them."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        limits.check_pixels(*src.size, name or "the image")
        return as_rgb(upright(src), white)
    is_bytes = isinstance(src, (bytes, bytearray))
    what = name or ("the image" if is_bytes else f"image {src}")
    try:
        limits.check_bytes(len(src) if is_bytes else Path(src).stat().st_size, what)
        with warnings.catch_warnings():  # Pillow warns about large images; the limits below decide
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src) if is_bytes else src)  # reads the header only
        limits.check_pixels(*img.size, what)
        img.load()
        return as_rgb(upright(img), white)
    except FileNotFoundError:
        raise InputError(f"{what} does not exist") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} cannot be decoded: not an image format this reader knows; send a PNG or JPEG") from None
    except Image.DecompressionBombError:  # Pillow's own header check, at twice its MAX_IMAGE_PIXELS: ours is lower
        raise InputError(f"{what} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} M pixels; at most "
                         f"{limits.max_pixels / 1e6:.1f} M pixels are decoded (max_image_pixels): resize it first") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{what} cannot be decoded: it is damaged ({detail}); send the complete file") from None


def upright(img):
    """The image turned as its EXIF orientation says (a phone's photo is stored sideways with a tag saying
    so), as Hugging Face's ``load_image`` turns it: the model sees what a viewer shows."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img


def as_rgb(img, white: bool = True):
    """RGB as Hugging Face's image processors make it (``convert_to_rgb``): transparent pixels over white.
    A plain ``convert("RGB")`` would keep the colour hidden under the transparency instead (often
    black), which such a model was never shown; ``white`` False: that plain conversion, for a processor
    that never converts (``over_white``)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if white and (img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def image_name(index: int, image: ImageInput, count: int) -> str | None:
    """How errors name a request's image: by index among several (bytes have no other name)."""
    if isinstance(image, (str, Path)):
        return None  # its path says it
    return f"image {index}" if count > 1 else None
