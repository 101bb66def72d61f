"""The focused tar reader agrees with the standard library's on every format we meet."""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset

from s3pipes.stages._tarparse import BLOCK, Member, TarFormatError, TarReader

LONG = "deep/" * 30 + "name-" * 10 + "x.seg.png"  # > 100 chars: needs pax / GNU / ustar prefix


def members(data: bytes, start: int = 0, chunk: int = 4096) -> list[Member]:
    stream = io.BytesIO(data)
    stream.seek(start)
    reader = TarReader(stream.read, start, chunk=chunk)
    found = []
    while (member := reader.next()) is not None:
        found.append(member)
    return found


def reference(data: bytes) -> list[tuple[str, bytes, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        out = []
        for info in tar:
            if info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                out.append((info.name, extracted.read(), info.offset))
        return out


def stdlib_tar(fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, payload in [("a.txt", b"x" * 512), ("empty.cls", b""), (LONG, b"y" * 1000), ("ü/ñ.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
        info = tarfile.TarInfo("last.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"end"))
    return buffer.getvalue()


def webdataset_tar() -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        for i in range(20):
            writer.write({"__key__": f"s{i:03d}", "jpg": bytes([i]) * (i * 300), "cls": str(i).encode()})
    return buffer.getvalue()


def gnu_tar(tmp_path: Path, fmt: str) -> bytes:
    root = tmp_path / fmt
    (root / Path(LONG).parent).mkdir(parents=True)
    (root / LONG).write_bytes(b"long" * 100)
    (root / "short.txt").write_text("hello")
    out = tmp_path / f"{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(root), "."], check=True)
    return out.read_bytes()


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"]
)
def test_matches_tarfile_for_stdlib_formats(fmt: int) -> None:
    data = stdlib_tar(fmt) if fmt != tarfile.USTAR_FORMAT else stdlib_tar_ustar()
    got = [(m.name, m.data, m.offset) for m in members(data)]
    assert got == reference(data)


def stdlib_tar_ustar() -> bytes:
    # ustar cannot hold the non-ASCII name; everything else is the same
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in [("a.txt", b"x" * 512), (LONG, b"y" * 1000)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("chunk", [BLOCK, 700, 3000, 1 << 20])
def test_matches_tarfile_for_webdataset_shards(chunk: int) -> None:
    """Reads of every size relative to members: refills inside headers, inside data, exactly at their ends."""
    data = webdataset_tar()
    assert [(m.name, m.data, m.offset) for m in members(data, chunk=chunk)] == reference(data)


def reused_views(data: bytes) -> Callable[[int], memoryview]:
    """``read(n)`` as ``ObjectStream.read_view`` does it: views of one buffer, overwritten by the next read."""
    buffer = bytearray(len(data))  # big enough for any read
    position = 0

    def read(n: int) -> memoryview:
        nonlocal position
        piece = data[position : position + n]
        position += len(piece)
        buffer[:] = b"\xee" * len(buffer)  # what the last view showed is gone
        buffer[: len(piece)] = piece
        return memoryview(buffer)[: len(piece)]

    return read


@pytest.mark.parametrize("chunk", [BLOCK, 700, 3000, 1 << 20])
def test_views_valid_until_the_next_read_are_copied_before_it(chunk: int) -> None:
    """Members, headers and tails joined across reads are copies: the next read overwrites the view."""
    for data in (webdataset_tar(), stdlib_tar(tarfile.PAX_FORMAT), stdlib_tar(tarfile.GNU_FORMAT)):
        reader = TarReader(reused_views(data), chunk=chunk)
        found = []
        while (member := reader.next()) is not None:
            found.append((member.name, member.data, member.offset))
        assert found == reference(data)
        assert all(type(data) is bytes for _, data, _ in found)


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_matches_tarfile_for_gnu_tar(tmp_path: Path, fmt: str) -> None:
    data = gnu_tar(tmp_path, fmt)
    got = [(m.name, m.data, m.offset) for m in members(data)]
    assert got == reference(data)
    assert any(name.endswith("x.seg.png") for name, _, _ in got)


@pytest.mark.parametrize("chunk", [BLOCK, 700, 1 << 20])
def test_resuming_at_any_member_offset_gives_the_rest(chunk: int) -> None:
    data = stdlib_tar(tarfile.PAX_FORMAT)
    everything = members(data, chunk=chunk)
    for i, member in enumerate(everything):
        assert members(data, start=member.offset, chunk=chunk) == everything[i:]
        assert members(data, start=member.next_offset, chunk=chunk) == everything[i + 1 :]


def test_truncation_inside_a_member_is_an_error_with_offset() -> None:
    data = webdataset_tar()
    big = max(members(data), key=lambda m: len(m.data))
    data_starts = big.next_offset - -(-len(big.data) // BLOCK) * BLOCK
    for cut in (big.offset + 100, big.offset + BLOCK + 7, data_starts + len(big.data) // 2):
        with pytest.raises(TarFormatError, match=r"truncated|ends inside") as info:
            members(data[:cut])
        assert big.offset <= info.value.offset < big.next_offset


def test_stream_ending_between_members_is_a_clean_end() -> None:
    data = webdataset_tar()
    everything = members(data)
    assert members(data[: everything[5].offset]) == everything[:5]


def test_corrupt_header_is_detected_by_checksum() -> None:
    data = bytearray(webdataset_tar())
    target = members(bytes(data))[3]
    data[target.offset + 10] ^= 0x20  # flip a bit in the (pax) header's name field
    with pytest.raises(TarFormatError, match="checksum") as info:
        members(bytes(data))
    assert info.value.offset == target.offset


def test_random_bytes_are_not_a_tar() -> None:
    with pytest.raises(TarFormatError, match="checksum"):
        members(bytes(range(256)) * 8)


def test_a_negative_size_is_an_error_not_a_member() -> None:
    header = bytearray(tarfile.TarInfo("bad.bin").tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = b"-0000000001\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(TarFormatError, match="negative number") as info:
        members(bytes(header) + bytes(2 * BLOCK))
    assert info.value.offset == 0


def one_member(name: bytes, payload: bytes, *, size_field: bytes | None = None, signed: bool = False) -> bytes:
    """A ustar archive of one member, its header written by hand (fields as unusual writers leave them)."""
    header = bytearray(tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT))
    header[0:100] = name.ljust(100, b"\0")
    header[124:136] = size_field if size_field is not None else b"%011o\0" % len(payload)
    header[148:156] = b" " * 8
    total = sum(byte - 256 if signed and byte >= 128 else byte for byte in header)  # old writers: signed bytes
    header[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(header) + payload.ljust(-(-len(payload) // BLOCK) * BLOCK, b"\0") + bytes(2 * BLOCK)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_checksums_of_both_sums_are_accepted_and_a_wrong_one_is_not(signed: bool) -> None:
    name = "caf\u00e9-\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9.txt".encode()  # bytes >= 128: the two sums differ
    data = one_member(name, b"hello", signed=signed)
    assert [(m.name, m.data) for m in members(data)] == [(name.decode(), b"hello")]
    broken = bytearray(data)
    broken[150] ^= 1  # a checksum digit
    with pytest.raises(TarFormatError, match="checksum"):
        members(bytes(broken))


@pytest.mark.parametrize(
    "size_field",
    [b"%011o\0" % 5, b"%011o " % 5, (b"%o\0" % 5).rjust(12, b" "), b"%012o" % 5, b"\x80" + (5).to_bytes(11, "big")],
    ids=["nul-ended", "space-ended", "space-padded", "twelve-digits", "base-256"],
)
def test_size_fields_in_every_form_writers_use(size_field: bytes) -> None:
    assert [m.data for m in members(one_member(b"a.bin", b"12345", size_field=size_field))] == [b"12345"]


def test_a_negative_checksum_is_an_error_even_where_it_equals_the_signed_sum() -> None:
    header = bytearray(b"\xff" * BLOCK)  # found by a review: the signed sum of this header is negative
    header[124:136] = b"\x80" + bytes(11)  # size 0, base-256
    header[156:157] = b"0"
    header[148:156] = b" " * 8
    signed = sum(byte - 256 if byte >= 128 else byte for byte in header)
    header[148:156] = (b"-%o" % -signed).ljust(8, b"\0")
    with pytest.raises(TarFormatError, match="negative number"):
        members(bytes(header) + bytes(2 * BLOCK))


@pytest.mark.parametrize(("value", "error"), [("-512", "negative pax size"), ("12x", "invalid pax size")])
def test_a_pax_size_that_is_not_a_size_is_an_error(value: str, error: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.a")
        info.size, info.pax_headers = 5, {"size": value}
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(TarFormatError, match=error) as caught:
        members(buffer.getvalue())
    assert caught.value.offset == 0


@pytest.mark.parametrize("seed", range(4))
def test_the_header_byte_sum_is_exact(seed: int) -> None:
    import random

    from s3pipes.stages._tarparse import _byte_sum

    rng = random.Random(seed)
    headers = [bytes(BLOCK), b"\xff" * BLOCK, *(rng.randbytes(BLOCK) for _ in range(200))]
    assert [_byte_sum(header, 0) for header in headers] == [sum(header) for header in headers]
    stream = memoryview(b"".join(headers))  # where the reader finds them: at an offset in a block
    assert [_byte_sum(stream, i * BLOCK) for i in range(len(headers))] == [sum(header) for header in headers]


def test_after_a_failed_read_every_next_raises_it_and_a_reopened_reader_resumes() -> None:
    data = webdataset_tar()
    everything = members(data, chunk=700)
    read = reused_views(data)
    calls = 0

    def failing_once(n: int) -> memoryview:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("the store went away")
        return read(n)

    reader = TarReader(failing_once, chunk=700)
    got = []
    with pytest.raises(OSError, match="went away"):
        while (member := reader.next()) is not None:
            got.append(member)
    with pytest.raises(OSError, match="went away"):  # not a parse of a buffer the stream may have reused
        reader.next()
    assert got == everything[: len(got)]
    assert members(data, start=reader.offset, chunk=700) == everything[len(got) :]


def batched(reader: TarReader, limit: int, sizes: list[int]) -> list[Member]:
    """Every member, as ``Untar.next_batch`` takes them: batches, and ``next()`` where a batch is empty."""
    found: list[Member] = []
    while True:
        batch = reader.next_batch(limit)
        sizes.append(len(batch))
        if batch:
            found += batch
        elif (member := reader.next()) is not None:
            found.append(member)
        else:
            return found


def every_shape(tmp_path: Path) -> dict[str, bytes]:
    pax_comment = io.BytesIO()  # a pax header of more than 256 bytes, without path or size
    with tarfile.open(fileobj=pax_comment, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size, info.pax_headers = 700, {"comment": "c" * 400}
            tar.addfile(info, io.BytesIO(b"z" * 700))
    # pax headers of two kinds of the same bytes (records of two lengths, alternating), one renaming its member
    alike = io.BytesIO()
    with tarfile.open(fileobj=alike, mode="w", format=tarfile.PAX_FORMAT) as tar:
        short, long = {"comment": "abcdefgh"}, {"comment": "abcdefghi"}
        for i, records in enumerate([short, long, {"path": "renamed.txt"}, long]):  # renamed: as long as short
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size, info.pax_headers = 5, records
            tar.addfile(info, io.BytesIO(b"12345"))
    return {
        "pax-alike": alike.getvalue(),
        "webdataset": webdataset_tar(),
        "pax": stdlib_tar(tarfile.PAX_FORMAT),
        "gnu": stdlib_tar(tarfile.GNU_FORMAT),
        "ustar-prefix": stdlib_tar_ustar(),
        "pax-comment": pax_comment.getvalue(),
        "signed-checksum": one_member("caf\u00e9-\u00fc\u00f1.txt".encode(), b"payload", signed=True),
        "high-bytes": one_member("\u00ff".encode() * 50, b"payload"),
        **{f"gnu-tar-{fmt}": gnu_tar(tmp_path, fmt) for fmt in ("gnu", "pax", "ustar")},
    }


@pytest.mark.parametrize("chunk", [BLOCK, 700, 3000, 1 << 20])
@pytest.mark.parametrize("limit", [1, 3, 32])
def test_batches_give_exactly_what_next_gives(tmp_path: Path, chunk: int, limit: int) -> None:
    for shape, data in every_shape(tmp_path).items():
        sizes: list[int] = []
        got = batched(TarReader(reused_views(data), chunk=chunk), limit, sizes)
        assert got == members(data, chunk=chunk), shape
        assert all(type(member.data) is bytes for member in got)
        assert max(sizes) <= limit
    sizes = []
    batched(TarReader(io.BytesIO(webdataset_tar()).read, chunk=1 << 20), limit, sizes)
    assert max(sizes) == limit  # the batches took the webdataset members, not next()


def test_pax_headers_of_the_same_bytes_still_have_their_records_read(tmp_path: Path) -> None:
    data = every_shape(tmp_path)["pax-alike"]
    first, second, third, fourth = (data[at : at + BLOCK] for at in range(0, 4 * 2048, 2048))
    assert first == third != second == fourth  # what next_batch remembers: the renaming one's bytes were seen
    sizes: list[int] = []
    got = batched(TarReader(io.BytesIO(data).read, chunk=1 << 20), 32, sizes)
    assert [member.name for member in got] == ["k0.txt", "k1.txt", "renamed.txt", "k3.txt"]


def test_a_batch_holds_at_most_max_bytes_of_data_or_one_larger_member() -> None:
    reader = TarReader(io.BytesIO(webdataset_tar()).read, chunk=1 << 20)
    assert reader.next() is not None  # a batch parses what was read: the buffer now holds the rest
    for max_bytes in (1, 2000, 5000):
        taken = sum(len(member.data) for member in reader.next_batch(max_bytes=max_bytes))
        following = reader.next_batch(limit=1)[0]  # the member that did not fit
        assert taken <= max_bytes < taken + len(following.data)
    big = max(members(webdataset_tar()), key=lambda member: len(member.data))
    reader = TarReader(io.BytesIO(webdataset_tar()).read, chunk=1 << 20)
    while reader.offset < big.offset:
        reader.next()
    assert reader.next_batch(max_bytes=1) == [big]  # alone, whatever its size


def test_a_batch_ends_before_a_corrupt_header_and_next_raises_there() -> None:
    data = bytearray(webdataset_tar())
    everything = members(bytes(data))
    for target in (everything[5].offset, everything[5].offset + BLOCK * 2):  # its pax header, its ustar header
        corrupt = bytearray(data)
        corrupt[target + 10] ^= 0x20
        reader = TarReader(io.BytesIO(bytes(corrupt)).read, chunk=1 << 20)
        assert reader.next() == everything[0]
        assert reader.next_batch() == everything[1:5]
        assert reader.next_batch() == []
        with pytest.raises(TarFormatError, match="checksum") as info:
            reader.next()
        assert info.value.offset == target
