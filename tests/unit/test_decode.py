"""Decoder: every builtin, every image form, handler precedence, errors, the bomb guard."""

from __future__ import annotations

import copy
import io
import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from s3pipes.decode import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_CHOICES, DecodeError, Decoder
from s3pipes.errors import S3PipesError

KEY, URL = "shard-000/0001", "memory://bucket/train/shard-000.tar"
W, H = 5, 3


def encode_image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (W, H)) -> bytes:
    im = Image.new(mode, size)
    if mode == "RGB":
        im.putpixel((0, 0), (255, 0, 10))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def sample(**fields: object) -> dict[str, object]:
    return {"__key__": KEY, "__url__": URL, **fields}


def test_default_limit_is_pillows_default() -> None:
    assert DEFAULT_MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3


@pytest.mark.parametrize(
    ("field", "data", "expected"),
    [
        ("cls", b"3", 3),
        ("cls2", b" 12\n", 12),
        ("index", b"0", 0),
        ("id", b"-4", -4),
        ("txt", "héllo".encode(), "héllo"),
        ("text", b"hi", "hi"),
        ("caption.txt", b"a cat", "a cat"),
        ("json", json.dumps({"a": [1, 2]}).encode(), {"a": [1, 2]}),
    ],
)
def test_scalar_builtins(field: str, data: bytes, expected: object) -> None:
    assert Decoder()(sample(**{field: data}))[field] == expected


def test_npy() -> None:
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.int16).reshape(2, 3))
    out = Decoder()(sample(npy=buf.getvalue()))["npy"]
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.int16).reshape(2, 3))


def test_npy_object_arrays_are_refused() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="npy"):
        Decoder()(sample(npy=buf.getvalue()))


@pytest.mark.parametrize("field", ["pt", "pth"])
def test_torch_tensors(field: str) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2, 2)}, buf)
    out = Decoder()(sample(**{field: buf.getvalue()}))[field]
    assert isinstance(out, dict)
    assert torch.equal(out["w"], torch.ones(2, 2))


def test_torch_load_refuses_arbitrary_objects() -> None:
    buf = io.BytesIO()
    torch.save(io.BytesIO(b"not a tensor"), buf)
    with pytest.raises(DecodeError):
        Decoder()(sample(pt=buf.getvalue()))


@pytest.mark.parametrize("field", ["pickle", "pyd", "x.pickle"])
def test_pickle_is_never_decoded(field: str) -> None:
    data = pickle.dumps({"a": 1})
    assert Decoder()(sample(**{field: data}))[field] == data


def test_pickle_decodes_only_with_an_explicit_handler() -> None:
    data = pickle.dumps({"a": 1})
    assert Decoder(handlers={"pickle": pickle.loads})(sample(pickle=data))["pickle"] == {"a": 1}


@pytest.mark.parametrize(
    ("field", "fmt"),
    [("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("ppm", "PPM"), ("webp", "WEBP"), ("seg.png", "PNG")],
)
def test_image_extensions_pil(field: str, fmt: str) -> None:
    out = Decoder()(sample(**{field: encode_image(fmt)}))[field]
    assert isinstance(out, Image.Image)
    assert out.size == (W, H)
    assert out.mode == "RGB"


@pytest.mark.parametrize(("field", "mode"), [("pgm", "L"), ("pbm", "1")])
def test_netpbm_gray_and_bitmap(field: str, mode: str) -> None:
    out = Decoder(image="numpy")(sample(**{field: encode_image("PPM", mode)}))[field]
    assert isinstance(out, np.ndarray)
    assert out.shape == (H, W, 3)


def test_pil_keeps_the_file_mode_and_is_loaded() -> None:
    out = Decoder()(sample(png=encode_image("PNG", "P")))["png"]
    assert isinstance(out, Image.Image)
    assert out.mode == "P"
    assert getattr(out, "fp", None) is None  # loaded: no file object held
    assert out.getpixel((0, 0)) == 0


def test_numpy_is_hwc_uint8_rgb_and_writable() -> None:
    out = Decoder(image="numpy")(sample(png=encode_image("PNG")))["png"]
    assert isinstance(out, np.ndarray)
    assert (out.shape, out.dtype) == ((H, W, 3), np.uint8)
    assert out[0, 0].tolist() == [255, 0, 10]
    assert out.flags.writeable


def test_numpy_converts_rgba_and_gray_to_rgb() -> None:
    for mode in ("RGBA", "L"):
        out = Decoder(image="numpy")(sample(png=encode_image("PNG", mode)))["png"]
        assert isinstance(out, np.ndarray)
        assert out.shape == (H, W, 3), mode


def test_torch_is_chw_uint8() -> None:
    out = Decoder(image="torch")(sample(png=encode_image("PNG")))["png"]
    assert isinstance(out, torch.Tensor)
    assert (tuple(out.shape), out.dtype) == ((3, H, W), torch.uint8)
    assert out[:, 0, 0].tolist() == [255, 0, 10]
    assert out.is_contiguous()


def test_torch_float_is_chw_float32_in_unit_range() -> None:
    out = Decoder(image="torch_float")(sample(png=encode_image("PNG")))["png"]
    assert isinstance(out, torch.Tensor)
    assert (tuple(out.shape), out.dtype) == ((3, H, W), torch.float32)
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 10 / 255])
    assert 0.0 <= out.min().item() <= out.max().item() <= 1.0


def test_invalid_image_choice_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="image='rgb8'") as info:
        Decoder(image="rgb8")
    for choice in IMAGE_CHOICES:
        assert choice in str(info.value)


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_max_image_pixels(bad: int) -> None:
    with pytest.raises(ValueError, match="max_image_pixels"):
        Decoder(max_image_pixels=bad)


def test_handler_must_be_callable() -> None:
    with pytest.raises(ValueError, match=r"handlers\['png'\]"):
        Decoder(handlers={"png": "not callable"})  # type: ignore[dict-item]


def test_full_field_name_wins_over_extension_and_builtin() -> None:
    decoder = Decoder(handlers={"seg.png": lambda b: "full", "png": lambda b: "ext"})
    out = decoder(sample(**{"seg.png": b"x", "png": b"y", "jpg": encode_image("JPEG")}))
    assert (out["seg.png"], out["png"]) == ("full", "ext")
    assert isinstance(out["jpg"], Image.Image)  # builtin still used for other extensions


def test_extension_handler_wins_over_builtin() -> None:
    assert Decoder(handlers={"cls": lambda b: b.decode()})(sample(cls=b"3"))["cls"] == "3"


def test_unknown_fields_and_metadata_pass_through() -> None:
    s = sample(**{"xyz": b"\x00\x01", "foo.bar": b"b", "__extra__": b"1"})
    out = Decoder()(s)
    assert out == s


def test_case_sensitive_extensions_pass_through() -> None:
    data = encode_image("JPEG")
    assert Decoder()(sample(JPG=data))["JPG"] == data


def test_non_bytes_values_pass_through() -> None:
    already = np.zeros(2)
    out = Decoder()(sample(npy=already, cls=3))
    assert out["npy"] is already
    assert out["cls"] == 3


def test_input_is_not_mutated() -> None:
    s = sample(cls=b"1", png=encode_image("PNG"), json=b"[1]")
    before = copy.deepcopy(s)
    out = Decoder()(s)
    assert s == before
    assert out is not s


def test_error_names_key_url_field_and_cause() -> None:
    with pytest.raises(DecodeError) as info:
        Decoder()(sample(txt=b"ok", **{"label.cls": b"cat"}))
    err = info.value
    assert (err.key, err.url, err.field) == (KEY, URL, "label.cls")
    for part in (KEY, URL, "'label.cls'", "ValueError"):
        assert part in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert isinstance(err, S3PipesError)
    assert isinstance(err, ValueError)


def test_handler_errors_are_wrapped_not_swallowed() -> None:
    def broken(data: bytes) -> object:
        raise RuntimeError("boom")

    with pytest.raises(DecodeError, match="RuntimeError: boom") as info:
        Decoder(handlers={"txt": broken})(sample(txt=b"x"))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_corrupt_image_raises() -> None:
    with pytest.raises(DecodeError, match="'jpg'"):
        Decoder()(sample(jpg=b"not an image"))


def test_formats_outside_the_allow_list_are_refused() -> None:
    with pytest.raises(DecodeError, match="UnidentifiedImageError"):
        Decoder()(sample(png=encode_image("GIF", "L")))


def test_decode_error_pickles_with_its_fields() -> None:
    err = DecodeError(KEY, URL, "jpg", "cause", member=f"{KEY}.JPG", offset=1536)
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.url, back.field, back.detail, str(back)) == (KEY, URL, "jpg", "cause", str(err))
    assert (back.member, back.offset) == (f"{KEY}.JPG", 1536) and "byte offset 1536" in str(back)


@pytest.mark.parametrize("image", IMAGE_CHOICES)
def test_bomb_guard_refuses_images_over_the_limit(image: str) -> None:
    data = encode_image("PNG", size=(100, 100))
    with pytest.raises(DecodeError, match=r"100x100 = 10000 pixels, over max_image_pixels=9999"):
        Decoder(image=image, max_image_pixels=9_999)(sample(png=data))
    assert Decoder(image=image, max_image_pixels=10_000)(sample(png=data))["png"] is not None


def test_bomb_guard_leaves_pillows_global_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DecodeError):
        Decoder(max_image_pixels=1)(sample(png=encode_image("PNG")))
    assert before == Image.MAX_IMAGE_PIXELS


def test_no_own_limit_with_none() -> None:
    out = Decoder(max_image_pixels=None)(sample(png=encode_image("PNG")))["png"]
    assert isinstance(out, Image.Image)


def test_one_decoder_shared_by_threads() -> None:
    decoder = Decoder(image="torch")
    samples = [sample(cls=str(i).encode(), png=encode_image("PNG", size=(i + 1, 2))) for i in range(32)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(decoder, samples))
    for i, out in enumerate(outs):
        png = out["png"]
        assert isinstance(png, torch.Tensor)
        assert (out["cls"], tuple(png.shape)) == (i, (3, 2, i + 1))


def test_repr_names_the_configuration() -> None:
    text = repr(Decoder(image="numpy", handlers={"seg.png": bytes}, max_image_pixels=10))
    assert text == "Decoder(image='numpy', handlers=['seg.png'], max_image_pixels=10)"
