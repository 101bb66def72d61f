"""GroupByKey: consecutive tar members sharing a key -> one sample dict.

Keys follow webdataset's rule: the directory plus the file name up to its first dot
is the key, the rest (lower-cased) is the field: ``a/b/x.seg.png`` -> key ``a/b/x``,
field ``seg.png``. Names with no dot in the file name are not sample members and are
skipped, as webdataset does.
"""

from __future__ import annotations

from collections import deque

from torchdata.nodes import BaseNode

from s3pipes._types import Sample, StateDict
from s3pipes.errors import DataError, DecodeError, DuplicateField
from s3pipes.stages._tarparse import Member
from s3pipes.stages.base import SOURCE_KEY, OnError, SkipLog, Stage, check_on_error
from s3pipes.stages.tar import TarMember, Untar

__all__ = ["GroupByKey", "Places", "add_field", "locate", "locate_from", "split_key"]


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name, or None when it names no sample field.

    Example:
        >>> split_key("a/b/x.seg.png"), split_key("img0001.JPG"), split_key("README")
        (('a/b/x', 'seg.png'), ('img0001', 'jpg'), None)
    """
    directory, slash, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return None
    return directory + slash + stem, field.lower()


def add_field(sample: Sample, field: str, data: bytes, *, member: str, offset: int) -> None:
    """Put one member's bytes into its sample; a field seen twice in one sample is an error.

    Raises:
        DuplicateField: names the shard (``sample["__url__"]``), the member and its offset.
    """
    if field in sample:
        raise DuplicateField(
            sample["__url__"],
            f"field {field!r} appears twice in sample {sample['__key__']!r}",
            member=member,
            offset=offset,
        )
    sample[field] = data


_Pulled = tuple[str, str, bytes, int, str, str]
"""A member as ``GroupByKey`` pulls it: url, member name, data, offset, sample key, field."""

Places = dict[str, tuple[str, int]]
"""Where a sample's fields came from: field -> (tar member name, byte offset of its first header)."""


def locate(error: DataError, places: Places) -> None:
    """Give a :class:`DecodeError` without a place the member and offset of its field, if ``places`` has them."""
    if isinstance(error, DecodeError) and error.offset is None and error.field in places:
        error.locate(*places[error.field])


def locate_from(source: object, error: DataError) -> None:
    """:func:`locate` ``error`` with what the nearest :class:`GroupByKey` upstream of ``source`` remembers.

    A decode stage calls this for the errors of its function: the sample it failed on was grouped
    upstream moments ago (within the last ``GroupByKey.REMEMBERED`` samples), so the group stage
    still knows each field's member and offset. Other errors, or samples grouped longer ago (a big
    shuffle buffer in between), are left as they are.
    """
    if not isinstance(error, DecodeError):
        return
    node = source
    while node is not None and not isinstance(node, GroupByKey):
        node = getattr(node, "source", None)
    if node is not None:
        locate(error, node.places(error.url, error.key))


class GroupByKey(Stage[Sample]):
    """Merges consecutive members with the same key (in the same shard) into a sample.

    Every sample has ``__key__`` and ``__url__`` (the shard). The position is that of the
    first member of the next sample, so a checkpoint between samples never splits one; after
    an error raised while a sample was being built, that sample's first member. A sample ends
    with its shard: from an ``Untar``, without waiting for the next shard to open.

    With ``Untar(on_error="skip")`` as the source, a sample whose member the shard broke in
    (the skip names that member) is dropped: its fields are incomplete. When the corrupt
    header cannot be read, the member is unknown and the sample before it is kept.

    Args:
        source: the tar members.
        on_error: ``"raise"`` (default): a field repeated within one sample raises. ``"skip"``:
            that whole sample (every member with its key) is dropped and recorded in ``skips``,
            kept in the state under ``"skipped"``.

    Raises:
        DuplicateField: a field repeats within one sample (names the shard, member and offset).
    """

    REMEMBERED = 4096
    """Samples whose field places are kept, newest first, for :func:`locate_from`."""

    def __init__(self, source: BaseNode[TarMember], *, on_error: OnError = "raise") -> None:
        super().__init__()
        self.source, self.on_error = source, check_on_error(on_error)
        self.skips = SkipLog()

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self.skips = SkipLog.of(initial_state)
        self._pending: _Pulled | None = None
        self._pending_state: StateDict | None = None
        self._recent: deque[tuple[str, str, list[tuple[str, str, int]]]] = deque(maxlen=self.REMEMBERED)
        # From an Untar, members come a batch at a time (``Untar.next_batch``), those not grouped
        # yet being _batch[_at:] of the shard _batch_url, and its state is built only when asked
        # for (``Untar.state_at``).
        self._untar = self.source if isinstance(self.source, Untar) else None
        self._batch: list[Member] = []
        self._batch_url = ""
        self._at = 0
        self._ahead: tuple[str, tuple[str, str] | None] = ("", None)  # split_key of the next sample's first member

    def _pull(self) -> _Pulled | None:
        """Next member that names a field, as ``(url, name, data, offset, key, field)``; None where
        a shard ends (from an ``Untar``: other sources end a shard's last sample with the next URL).

        The source state from before it goes to ``_pending_state``, except from an ``Untar``:
        asking it for its state before every member cost ~7% of a raw streaming pass.
        """
        untar = self._untar
        while True:
            if untar is not None:
                before = None
                if self._at == len(self._batch):
                    batch = untar.next_batch()
                    if batch is None:
                        return None
                    (self._batch_url, self._batch), self._at = batch, 0
                url, (name, data, offset, _) = self._batch_url, self._batch[self._at]
                self._at += 1
            else:
                before = self.source.state_dict()
                item = next(self.source)  # a TarMember, or anything with its attributes
                url, name, data, offset = item.url, item.name, item.data, item.offset
            parts = split_key(name)
            if parts is not None:
                self._pending_state = before
                return url, name, data, offset, parts[0], parts[1]

    def next(self) -> Sample:
        if self._untar is not None and self._pending is None:
            sample = self._group_batch()  # the hot path: no skip can happen in a batch
            if sample is not None:
                self.items_out += 1
                return sample
        while True:
            skips = getattr(self.source, "skips", None)  # Untar(on_error="skip")'s SkipLog
            skipped_before = skips.count if skips is not None else 0
            sample = self._group()
            if sample is None:  # dropped for a repeated field, under on_error="skip"
                continue
            if skips is not None and skips.count != skipped_before and self._cut_short(sample, skips.entries[-1]):
                continue  # the shard broke inside this sample's members: drop the partial sample
            self.items_out += 1
            return sample

    @staticmethod
    def _cut_short(sample: Sample, skip: dict[str, object]) -> bool:
        member = skip.get("member")
        parts = split_key(member) if isinstance(member, str) else None
        return skip.get("url") == sample["__url__"] and parts is not None and parts[0] == sample["__key__"]

    def _group(self) -> Sample | None:
        """The next sample; None when it had a repeated field and ``on_error="skip"`` dropped it."""
        while self._pending is None:
            self._pending = self._pull()
        # _pending stays the sample's first member until the sample is complete: the state
        # after an error raised while it is being built resumes at its start, not in its middle.
        first, first_state = self._pending, self._pending_state
        url, name, data, offset, key, field = first
        sample: Sample = {"__key__": key, "__url__": url, field: data}
        members = [(field, name, offset)]  # for places(): a dict per sample cost ~1 us more
        broken: DuplicateField | None = None
        try:
            while True:
                try:
                    following = self._pull()
                except StopIteration:
                    following = None
                if following is None:  # the end of the shard (or of the source)
                    self._pending = self._pending_state = None
                    break
                if following[4] != key or following[0] != url:
                    if self._untar is not None:  # it is _batch[_at - 1]: left there for the next sample
                        self._at -= 1
                        self._pending = None
                    else:
                        self._pending = following
                    break
                if broken is not None:
                    continue  # the rest of a sample being dropped
                _, name, data, offset, _, field = following
                try:
                    add_field(sample, field, data, member=name, offset=offset)
                    members.append((field, name, offset))
                except DuplicateField as exc:
                    if self.on_error == "raise":
                        raise
                    broken = exc
        except BaseException:
            self._pending_state = first_state
            raise
        if broken is not None:
            self.skips.record(broken)
            return None
        self._recent.append((key, url, members))
        return sample

    def _group_batch(self) -> Sample | None:
        """The next sample, when all of it and the next sample's first member are in the batch; else None.

        The hot path from an ``Untar``: what ``_group`` does, in one loop over the batch. Anything
        else (a sample that may go on in the next batch, a repeated field, a member naming no field)
        is left to ``_group``, nothing changed.
        """
        batch, at, url = self._batch, self._at, self._batch_url
        count = len(batch)
        if at + 1 >= count:
            return None
        name, data, offset, _ = batch[at]
        ahead_name, parts = self._ahead  # split_key of the member that ended the last sample
        if name != ahead_name:
            parts = split_key(name)
        if parts is None:
            return None
        key, field = parts
        sample: Sample = {"__key__": key, "__url__": url, field: data}
        members = [(field, name, offset)]
        # A member of the same sample is named key + "." + field, with no "/" in field: split_key
        # for each member cost ~3.5k instructions, this test ~1.3k (perf stat).
        prefix = key + "."
        start = len(prefix)
        end = at + 1
        while end < count:
            name, data, offset, _ = batch[end]
            field = name[start:]
            if not name.startswith(prefix) or "/" in field:  # not of this sample: the next one's, or no field
                parts = split_key(name)
                if parts is None:
                    return None  # _group skips it, and the sample may go on after it
                self._ahead = (name, parts)
                break
            field = field.lower()
            if field in sample:
                return None
            sample[field] = data
            members.append((field, name, offset))
            end += 1
        else:
            return None
        self._at = end
        self._recent.append((key, url, members))
        return sample

    def places(self, url: str, key: str) -> Places:
        """Where the fields of a recently returned sample came from ({} if it is not remembered)."""
        for recent_key, recent_url, members in reversed(self._recent):  # searched only on a decode error
            if recent_key == key and recent_url == url:
                return {field: (name, offset) for field, name, offset in members}
        return {}

    def get_state(self) -> StateDict:
        source_state: StateDict | None
        if self._pending is None:
            if self._untar is not None and self._at < len(self._batch):
                source_state = self._untar.state_at(self._batch[self._at].offset)
            else:
                source_state = self.source.state_dict()
        elif isinstance(self.source, Untar):
            source_state = self.source.state_at(self._pending[3])
        else:
            source_state = self._pending_state
        return self.skips.save_into({SOURCE_KEY: source_state}, self.on_error)
