"""GroupByKey: consecutive tar members sharing a key -> one sample dict.

Keys follow webdataset's rule: the directory plus the file name up to its first dot
is the key, the rest (lower-cased) is the field: ``a/b/x.seg.png`` -> key ``a/b/x``,
field ``seg.png``. Names with no dot in the file name are not sample members and are
skipped, as webdataset does.
"""

from __future__ import annotations

from torchdata.nodes import BaseNode

from s3pipes._types import Sample, StateDict
from s3pipes.errors import DuplicateField
from s3pipes.stages.base import SOURCE_KEY, Stage
from s3pipes.stages.tar import TarMember

__all__ = ["GroupByKey", "add_field", "split_key"]


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


class GroupByKey(Stage[Sample]):
    """Merges consecutive members with the same key (in the same shard) into a sample.

    Every sample has ``__key__`` and ``__url__`` (the shard). The position is that of the
    first member of the next sample, so a checkpoint between samples never splits one.

    With ``Untar(on_error="skip")`` as the source, a sample whose member the shard broke in
    (the skip names that member) is dropped: its fields are incomplete. When the corrupt
    header cannot be read, the member is unknown and the sample before it is kept.

    Raises:
        DuplicateField: a field repeats within one sample (names the shard and member).
    """

    def __init__(self, source: BaseNode[TarMember]) -> None:
        super().__init__()
        self.source = source

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self._pending: tuple[TarMember, str, str] | None = None
        self._pending_state: StateDict | None = None

    def _pull(self) -> tuple[TarMember, str, str]:
        """Next member that names a field, with the source state from before it."""
        while True:
            before = self.source.state_dict()
            member = next(self.source)
            parts = split_key(member.name)
            if parts is not None:
                self._pending_state = before
                return member, *parts

    def next(self) -> Sample:
        while True:
            skips = getattr(self.source, "skips", None)  # Untar(on_error="skip")'s SkipLog
            skipped_before = skips.count if skips is not None else 0
            sample = self._group()
            if skips is not None and skips.count != skipped_before and self._cut_short(sample, skips.entries[-1]):
                continue  # the shard broke inside this sample's members: drop the partial sample
            self.items_out += 1
            return sample

    @staticmethod
    def _cut_short(sample: Sample, skip: dict[str, object]) -> bool:
        member = skip.get("member")
        parts = split_key(member) if isinstance(member, str) else None
        return skip.get("url") == sample["__url__"] and parts is not None and parts[0] == sample["__key__"]

    def _group(self) -> Sample:
        first = self._pending if self._pending is not None else self._pull()
        self._pending = None
        member, key, field = first
        sample: Sample = {"__key__": key, "__url__": member.url, field: member.data}
        while True:
            try:
                following = self._pull()
            except StopIteration:
                self._pending_state = None
                return sample
            member, next_key, field = following
            if next_key != key or member.url != sample["__url__"]:
                self._pending = following
                return sample
            add_field(sample, field, member.data, member=member.name, offset=member.offset)

    def get_state(self) -> StateDict:
        if self._pending is not None:
            return {SOURCE_KEY: self._pending_state}
        return {SOURCE_KEY: self.source.state_dict()}
