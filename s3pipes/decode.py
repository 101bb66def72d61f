"""Decode the byte fields of a WebDataset sample: pure functions, no I/O, no shared state.

A sample is a dict with ``"__key__"``, ``"__url__"`` and one ``bytes`` value per
field, named by extension (``"jpg"``, ``"cls"``, ``"seg.png"``). :class:`Decoder`
turns it into a new dict of Python objects; ``Pipe.decode()`` applies one to
every sample.

Builtin decoders, chosen by the field's LAST extension (``"seg.png"`` -> ``"png"``,
matched case-sensitively, like WebDataset's key grouping):

- ``jpg jpeg png ppm pgm pbm webp``: an image, in the ``image`` form (see below).
- ``cls cls2 index id``: ``int``.  ``txt text``: ``str`` (UTF-8).  ``json``: ``json.loads``.
- ``npy``: ``np.load(..., allow_pickle=False)``.
- ``pt pth``: ``torch.load(..., weights_only=True, map_location="cpu")``.
- ``pickle pyd``: never decoded; they stay ``bytes``. Unpickling runs arbitrary code
  chosen by whoever wrote the shard. Pass a handler to opt in for a trusted source.

Every other field stays ``bytes``. Fields starting with ``"__"`` and values that are
not ``bytes`` (already decoded) pass through untouched.

A field that fails raises :class:`s3pipes.errors.DecodeError` naming the sample,
the shard and the field; a pipeline's decode stage (and ``MapDataset.from_shards``)
adds the tar member and its byte offset.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import numpy as np
import torch
from PIL import Image

from s3pipes.errors import DecodeError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_CHOICES", "DecodeError", "Decoder"]

#: Pillow's own default for ``Image.MAX_IMAGE_PIXELS`` (1024**3 // 4 // 3), as a constant.
DEFAULT_MAX_IMAGE_PIXELS: Final = 89_478_485
#: Valid values of ``Decoder(image=...)``.
IMAGE_CHOICES: Final = ("pil", "numpy", "torch", "torch_float")

_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "ppm", "pgm", "pbm", "webp"})
# Pillow plugins allowed to parse image bytes, whatever the extension claims. Others
# (EPS runs Ghostscript, for one) are refused: a shard is untrusted input.
_IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "WEBP")
_NEVER_DECODED = frozenset({"pickle", "pyd"})
_BUILTINS: Mapping[str, Callable[[bytes], object]] = MappingProxyType(
    {
        **dict.fromkeys(("cls", "cls2", "index", "id"), lambda data: int(data.decode("utf-8"))),
        **dict.fromkeys(("txt", "text"), lambda data: data.decode("utf-8")),
        "json": json.loads,
        "npy": lambda data: np.load(io.BytesIO(data), allow_pickle=False),
        **dict.fromkeys(
            ("pt", "pth"), lambda data: torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        ),
    }
)


class Decoder:
    """Turn a sample's ``bytes`` fields into objects; returns a new dict, never mutates.

    Handlers are looked up by full field name (``"seg.png"``), then by last extension
    (``"png"``), before the builtins. Instances hold only read-only configuration,
    so one decoder may be shared by many threads.

    Images: ``"pil"`` gives a loaded ``PIL.Image.Image`` in its file's own mode
    (``"L"``, ``"P"``, ``"RGBA"``, ...); ``"numpy"`` an ``HxWx3`` ``uint8`` RGB array;
    ``"torch"`` a ``3xHxW`` ``uint8`` tensor; ``"torch_float"`` a ``3xHxW`` ``float32``
    tensor in [0, 1]. The array forms convert to 8-bit RGB, dropping alpha and turning
    palette indices into colours: decode masks with ``image="pil"`` or a handler.
    Only the first frame of an animated image is decoded.

    Decompression bombs: if the header declares more than ``max_image_pixels``
    (width x height) the image is refused before its pixels are decoded. This is
    checked per decoder; Pillow's global ``Image.MAX_IMAGE_PIXELS`` is never changed
    and still applies inside ``Image.open`` (a warning above it, an error above twice
    it): a limit above Pillow's does not lift Pillow's, and ``None`` turns off only
    this decoder's own check. Only images are guarded: ``npy``, ``pt`` and ``json``
    fields may allocate more memory than their size in the shard.

    Args:
        image: the image form, one of :data:`IMAGE_CHOICES`.
        handlers: field name or extension -> ``fn(bytes) -> object``; these win over
            the builtins and may opt in to ``pickle``.
        max_image_pixels: refuse images with more pixels than this; ``None``: no own limit.

    Raises:
        ValueError: an unknown ``image``, a non-positive ``max_image_pixels``, or a
            handler that is not callable (at construction).
        DecodeError: when called, for the first field that fails (chained ``from`` the cause).

    Example:
        >>> decode = Decoder(handlers={"seg.txt": bytes.upper})
        >>> out = decode({"__key__": "k1", "__url__": "memory://b/s.tar", "cls": b"7", "seg.txt": b"x"})
        >>> out["cls"], out["seg.txt"]
        (7, b'X')
    """

    def __init__(
        self,
        image: str = "pil",
        handlers: Mapping[str, Callable[[bytes], object]] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if image not in IMAGE_CHOICES:
            raise ValueError(f"{image=} is not an image form; choose one of {', '.join(IMAGE_CHOICES)}")
        if max_image_pixels is not None and max_image_pixels <= 0:
            raise ValueError(f"{max_image_pixels=} must be a positive int, or None for no own limit")
        handlers = dict(handlers or {})
        for name, fn in handlers.items():
            if not callable(fn):
                raise ValueError(f"handlers[{name!r}]={fn!r} is not callable; pass fn(bytes) -> object")
        self._image, self._max_pixels = image, max_image_pixels
        self._handlers: Mapping[str, Callable[[bytes], object]] = MappingProxyType(handlers)

    def __repr__(self) -> str:
        handlers = sorted(self._handlers)
        return f"Decoder(image={self._image!r}, handlers={handlers}, max_image_pixels={self._max_pixels})"

    def __call__(self, sample: Mapping[str, object]) -> dict[str, object]:
        """Return a new sample with every decodable ``bytes`` field decoded (see the class)."""
        out = dict(sample)
        for field, value in sample.items():
            if field.startswith("__") or not isinstance(value, bytes):
                continue
            fn = self._find(field)
            if fn is None:
                continue
            try:
                out[field] = fn(value)
            except Exception as exc:
                key, url = sample.get("__key__", "<no __key__>"), sample.get("__url__", "<no __url__>")
                detail = f"{type(exc).__name__}: {exc}"
                raise DecodeError(str(key), str(url), field, detail) from exc
        return out

    def _find(self, field: str) -> Callable[[bytes], object] | None:
        extension = field.rpartition(".")[2]
        for name in (field, extension):
            if name in self._handlers:
                return self._handlers[name]
        if extension in _NEVER_DECODED:
            return None
        return self._decode_image if extension in _IMAGE_EXTENSIONS else _BUILTINS.get(extension)

    def _decode_image(self, data: bytes) -> object:
        with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as im:
            width, height = im.size
            if self._max_pixels is not None and width * height > self._max_pixels:
                raise ValueError(
                    f"image is {width}x{height} = {width * height} pixels, over max_image_pixels={self._max_pixels} "
                    "(a decompression bomb?); raise max_image_pixels if this source is trusted"
                )
            if self._image == "pil":
                im.load()
                return im
            rgb = np.array(im.convert("RGB"))  # a writable HxWx3 uint8 copy
        if self._image == "numpy":
            return rgb
        chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        return chw if self._image == "torch" else chw.float().div_(255.0)
