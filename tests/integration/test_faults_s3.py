"""s3pipes under injected faults (issue 8): resets, truncations, 503/500 and stalls between it and SeaweedFS.

Every test talks to the session's SeaweedFS through a :class:`tests.faultproxy.FaultProxy`
and asserts both the result (exact bytes, exactly once) and that faults really happened
(the proxy's counters). Data is written directly, not through the proxy, unless writing
under faults is the point. Timeouts are small so that a hang fails fast.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
import torch
import webdataset

import s3pipes as sp
from s3pipes import MapDataset, Store, errors
from s3pipes.checkpoint import CheckpointStore
from s3pipes.convert import ObjectSamples
from s3pipes.server import LocalS3Server
from s3pipes.stages.open import ObjectStream
from tests.faultproxy import FaultProxy, Kind, Rule

pytestmark = pytest.mark.integration

BLOCK = 256 << 10  # ranged GETs of 256 KiB while streaming: many requests per shard


def proxied(server: LocalS3Server, proxy: FaultProxy) -> Store:
    """A Store that goes through the proxy, with the server's credentials and small timeouts."""
    return Store({**server.storage_options, "endpoint_url": proxy.endpoint_url}, connect_timeout=2, read_timeout=3)


@pytest.fixture
def proxy(s3_server: LocalS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=8, max_requests=5_000, max_lifetime=80) as proxy:
        yield proxy


def get_faults(probability: float = 0.1, *, statuses: bool = False) -> list[Rule]:
    """Resets and truncations on ``probability`` of the GETs between them (the issue's "10% of requests"),
    and with ``statuses`` 503 SlowDown and 500 replies on another half and quarter of that."""
    half = probability / 2
    rules = [Rule("reset", probability=half), Rule("truncate", probability=half)]
    if statuses:
        rules += [Rule("status", status=503, probability=half), Rule("status", status=500, probability=half / 2)]
    return rules


# -- the streaming pipeline ------------------------------------------------------------------


def write_shards(store: Store, prefix: str, shards: int, per_shard: int) -> dict[str, bytes]:
    """Tar shards of small random members (~50 KiB each); ``{key: bytes}`` of what was written."""
    rng = random.Random(0)
    written = {}
    for s in range(shards):
        with store.open(f"{prefix}/shard-{s:03d}.tar", "wb") as f, webdataset.TarWriter(f) as writer:
            for i in range(per_shard):
                key = f"sample{s * per_shard + i:05d}"
                written[key] = rng.randbytes(rng.randrange(20_000, 80_000))
                writer.write({"__key__": key, "bin": written[key]})
    return written


@pytest.mark.timeout(60)
def test_streaming_delivers_every_sample_once_and_exact_under_resets_and_truncations(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy
) -> None:
    written = write_shards(s3_store, s3_root, shards=4, per_shard=60)  # ~3 MiB a shard
    # A shard read in order comes over one GET, asked again for its rest after each fault: faults
    # on a share of the GETs (not a probability), so that both kinds happen in a few requests.
    proxy.set_rules(
        [Rule("reset", every_nth=4, path_contains="shard-"), Rule("truncate", every_nth=3, path_contains="shard-")]
    )
    store = proxied(s3_server, proxy)
    pipe = (
        sp.list_prefix(f"{s3_root}/", suffix=".tar", store=store).open_object(block_size=BLOCK).untar().group_by_key()
    )
    seen: dict[str, bytes] = {}
    for sample in pipe:
        assert sample["__key__"] not in seen, f"{sample['__key__']} delivered twice"
        seen[sample["__key__"]] = sample["bin"]
    assert proxy.faults["reset"] > 0 and proxy.faults["truncate"] > 0, proxy
    assert sorted(seen) == sorted(written)
    assert [k for k in written if seen[k] != written[k]] == []


@pytest.mark.timeout(60)
def test_a_shard_read_by_untar_is_one_get_of_many_blocks_and_a_resume_asks_only_for_the_rest(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy
) -> None:
    write_shards(s3_store, s3_root, shards=3, per_shard=40)  # ~2 MiB a shard: ~8 blocks of 256 KiB

    def make() -> sp.Pipe:
        shards = sp.list_prefix(f"{s3_root}/", suffix=".tar", store=proxied(s3_server, proxy))
        return shards.open_object(block_size=BLOCK).untar().group_by_key()

    pipe = make()
    samples = iter(pipe)
    for _ in range(50):  # into the second shard
        next(samples)
    state = pipe.state_dict()
    rest = [sample["__key__"] for sample in samples]
    gets = [target for method, target, _ in proxy.log if method == "GET" and "shard-" in target]
    assert len(gets) == 3, gets
    proxy.log.clear()
    resumed = make()
    resumed.load_state_dict(state)
    assert [sample["__key__"] for sample in resumed] == rest
    gets = [target for method, target, _ in proxy.log if method == "GET" and "shard-" in target]
    assert len(gets) == 2, gets  # the rest of the second shard from its next member, and the third


# -- map-style datasets ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_map_dataset_items_are_exact_under_resets_truncations_and_5xx(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy
) -> None:
    rng = random.Random(1)
    objects = {
        f"{s3_root}/items/{n // 100}/{n:05d}.bin": rng.randbytes(rng.randrange(1_000, 8_000)) for n in range(300)
    }
    fs, _ = s3_store.resolve(s3_root)
    fs.pipe({s3_store.resolve(url)[1]: data for url, data in objects.items()})
    store = proxied(s3_server, proxy)
    ds = MapDataset.from_prefix(f"{s3_root}/items/", store=store, manifest=False)  # the listing, fault-free
    assert len(ds) == len(objects)
    proxy.set_rules(get_faults(0.1, statuses=True))
    got = []
    for start in range(0, len(ds), 64):
        got += ds.__getitems__(list(range(start, min(start + 64, len(ds)))))
    assert proxy.faults["reset"] > 0 and proxy.faults["truncate"] > 0 and proxy.faults["status"] > 0, proxy
    expected = [objects[url] for url in sorted(objects)]
    assert [n for n, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b] == []


# -- checkpoints -----------------------------------------------------------------------------


def state_of(step: int, mib: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(mib << 18, generator=generator)}  # float32: mib MiB


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a["step"] == b["step"] and torch.equal(a["w"], b["w"])  # type: ignore[arg-type]


WRITE_FAULTS = [
    Rule("status", status=503, probability=0.15, methods=("PUT", "POST", "DELETE")),
    Rule("status", status=500, probability=0.05, methods=("PUT", "POST", "DELETE")),
    Rule("reset", probability=0.1, methods=("PUT", "POST", "DELETE")),
]


@pytest.mark.timeout(90)
def test_checkpoint_saves_and_loads_exactly_under_faults(
    s3_server: LocalS3Server, s3_root: str, proxy: FaultProxy
) -> None:
    ckpt = CheckpointStore(f"{s3_root}/run", store=proxied(s3_server, proxy))
    state = state_of(1, 20)  # 20 MiB: three parts of a multipart upload
    proxy.set_rules(WRITE_FAULTS)
    ckpt.save(state, step=1)
    write_faults = sum(proxy.faults.values())
    # every few GETs, not a probability: a load is only a handful of requests, and each must meet some
    proxy.set_rules(
        [Rule("reset", every_nth=3), Rule("truncate", every_nth=4), Rule("status", status=503, every_nth=5)]
    )
    loaded = ckpt.load()
    assert write_faults > 0 and sum(proxy.faults.values()) > write_faults, proxy
    assert same(loaded, state)


@pytest.mark.timeout(90)
def test_checkpoint_never_shows_a_partial_state_across_faulty_saves(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy
) -> None:
    """A save may fail (the error says so); a load, fault-free, returns a state some save asked for, whole."""
    faulty = CheckpointStore(f"{s3_root}/run", store=proxied(s3_server, proxy))
    clean = CheckpointStore(f"{s3_root}/run", store=s3_store)
    proxy.set_rules([*WRITE_FAULTS, Rule("reset", probability=0.05, methods=("GET", "HEAD"))])
    attempted: list[dict[str, object]] = []
    committed: dict[str, object] | None = None
    failures = []
    for step in range(1, 7):
        state = state_of(step, 10)  # 10 MiB: two parts
        attempted.append(state)
        try:
            faulty.save(state, step=step)
            committed = state
        except errors.S3PipesError as exc:
            failures.append(exc)  # a failed save may still have committed: it is among the candidates
        try:
            loaded = clean.load()
        except errors.CheckpointNotFound:
            assert committed is None, "a save returned, but nothing is committed"
            continue
        candidates = attempted if committed is None else attempted[attempted.index(committed) :]
        assert any(same(loaded, c) for c in candidates), f"step {loaded['step']} loaded, not one that was saved"
    assert sum(proxy.faults.values()) > 0, proxy
    assert committed is not None, f"every save failed: {failures}"


# -- conversion ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_conversion_under_get_faults_is_identical_to_a_fault_free_one(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy
) -> None:
    rng = random.Random(2)
    raw = f"{s3_root}/raw"
    objects = {f"{raw}/{n % 3}/{n:04d}.png": rng.randbytes(rng.randrange(500, 5_000)) for n in range(150)}
    fs, _ = s3_store.resolve(raw)
    fs.pipe({s3_store.resolve(url)[1]: data for url, data in objects.items()})

    def run(store: Store, name: str) -> dict[str, bytes]:
        result = sp.convert(
            ObjectSamples(f"{raw}/", label_from_path=1, store=store),
            f"{s3_root}/{name}/train-{{shard:06d}}.tar",
            f"{raw}/",
            maxcount=40,
            store=store,
            progress=False,
        )
        urls = [f"{s3_root}/{name}/{shard.name}" for shard in result.shards]
        return {url.rsplit("/", 1)[1]: data for url, data in zip(urls, s3_store.read_ranges(urls), strict=True)}

    reference = run(s3_store, "reference")
    proxy.set_rules(get_faults(0.1, statuses=True))
    faulted = run(proxied(s3_server, proxy), "faulted")
    assert sum(proxy.faults.values()) > 0, proxy
    assert sorted(faulted) == sorted(reference) and len(reference) == 4
    assert [name for name in reference if faulted[name] != reference[name]] == []


# -- retries exhausted -----------------------------------------------------------------------

ATTEMPTS = re.compile(r"\b\d+ (attempts|tries)\b|\bafter \d+\b|\battempt \d+ of \d+\b", re.IGNORECASE)
CAUSES = {
    "status": re.compile(r"SlowDown|503", re.IGNORECASE),
    "reset": re.compile(r"reset|closed|dropped|disconnect", re.IGNORECASE),
    "truncate": re.compile(r"payload|truncat|incomplete|short|bytes of|closed|dropped", re.IGNORECASE),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("read", "kind"),
    [  # read_bytes: s3fs/aiobotocore; read_ranges: _fastget; stream: ObjectStream (over read_bytes)
        ("read_bytes", "status"),
        ("read_bytes", "reset"),
        ("read_ranges", "status"),
        ("read_ranges", "reset"),
        ("stream", "truncate"),
    ],
)
def test_exhausted_retries_name_the_object_the_attempts_and_the_last_cause(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy, kind: Kind, read: str
) -> None:
    url = f"{s3_root}/doomed-{kind}.bin"
    s3_store.write_bytes(url, bytes(range(256)) * 1024)  # 256 KiB
    proxy.set_rules([Rule(kind, path_contains="doomed")])  # every request for it fails
    store = proxied(s3_server, proxy)
    with pytest.raises(errors.StoreError) as caught:
        if read == "read_bytes":
            store.read_bytes(url)
        elif read == "read_ranges":
            store.read_ranges([url])
        else:
            with ObjectStream(url, store, block_size=64 << 10) as stream:
                stream.read()
    message = str(caught.value)
    gets = sum(1 for method, target, fault in proxy.log if "doomed" in target.split("?")[0] and fault)
    problems = [
        *([] if url in message else ["the object is not named"]),
        *([] if CAUSES[kind].search(message) else [f"the last cause ({kind}) is not named"]),
        *([] if ATTEMPTS.search(message) else [f"the number of attempts ({gets} failed requests for it) is not named"]),
        *([] if gets >= 2 else [f"the failure was not retried ({gets} request for the object)"]),
    ]
    assert problems == [], f"{type(caught.value).__name__}: {message!r}"
