"""Declarative specs: Pipe -> plain dict / YAML -> an equal Pipe; fingerprints in the state dict."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import webdataset

import s3pipes as sp
from s3pipes import ConfigError, Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.spec import from_spec, spec_fingerprint

SHARDS, PER_SHARD = 4, 5


def add_label(sample: dict[str, Any], offset: int = 0) -> dict[str, Any]:
    return {**sample, "label": sample["cls"] + offset}


def keep_even(sample: dict[str, Any]) -> bool:
    return int(sample["__key__"][-2:]) % 2 == 0


def key_of(sample: dict[str, Any]) -> str:
    return str(sample["__key__"])


class Shouter:
    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample

    def method(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample


@pytest.fixture
def shards(tmp_path: Path) -> str:
    root, store = f"file://{tmp_path}/data", Store()
    for s in range(SHARDS):
        with store.open(f"{root}/shard-{s:03d}.tar", "wb") as f, webdataset.TarWriter(f) as writer:
            for i in range(PER_SHARD):
                n = s * PER_SHARD + i
                writer.write({"__key__": f"sample{n:04d}", "cls": str(n % 3).encode(), "txt": b"x" * n})
    return root


def full_pipe(shards: str) -> sp.Pipe[Any]:
    return (
        sp.list_prefix(f"{shards}/", suffix=".tar")
        .shuffle_shards(3)
        .open_object(block_size=1 << 16)
        .untar()
        .group_by_key()
        .decode("numpy", workers=2)
        .map(functools.partial(add_label, offset=10))
        .filter(keep_even)
        .shuffle(4, seed=1)
        .map(key_of)
        .batch(3, collate=None)
    )


def test_round_trip_through_plain_json_gives_an_equal_pipe_and_the_same_items(shards: str) -> None:
    pipe = full_pipe(shards)
    spec = pipe.to_spec()
    assert json.loads(json.dumps(spec)) == spec  # plain data only
    assert spec["shuffle_shards"] == 3
    assert [stage["stage"] for stage in spec["stages"]] == [
        *("open_object", "untar", "group_by_key", "decode", "map", "filter", "shuffle", "map", "batch")
    ]
    assert spec["stages"][3] == {
        "stage": "decode",
        "image": "numpy",
        "handlers": {},
        "max_image_pixels": 89_478_485,
        "workers": 2,
    }
    assert spec["stages"][4]["fn"] == {"partial": f"{__name__}:add_label", "args": [], "kwargs": {"offset": 10}}
    rebuilt = from_spec(json.loads(json.dumps(spec)), store=Store())
    assert rebuilt.to_spec() == spec
    assert list(rebuilt) == list(pipe)
    assert rebuilt.spec_fingerprint() == pipe.spec_fingerprint() is not None


def test_yaml_text_and_files_round_trip(shards: str, tmp_path: Path) -> None:
    pipe = sp.list_prefix(f"{shards}/").open_object().untar().group_by_key().decode().map(key_of)
    text = pipe.to_yaml()
    assert "stage: decode" in text and f"fn: {__name__}:key_of" in text
    (tmp_path / "pipe.yaml").write_text(text)
    (tmp_path / "pipe.json").write_text(json.dumps(pipe.to_spec()))
    for source in (text, str(tmp_path / "pipe.yaml"), tmp_path / "pipe.json"):
        rebuilt = from_spec(source, store=Store())
        assert rebuilt.to_spec() == pipe.to_spec()
        assert list(rebuilt) == [f"sample{n:04d}" for n in range(SHARDS * PER_SHARD)]


def test_default_collate_and_builtin_methods_are_written_by_a_public_path() -> None:
    spec = sp.from_urls("memory://b/{0..1}.tar", store=Store()).map(str.upper).batch(2).to_spec()
    assert spec["stages"][0]["fn"] == "builtins:str.upper"
    assert spec["stages"][1]["collate"] == "torch.utils.data:default_collate"
    assert from_spec(spec, store=Store()).to_spec() == spec


def test_hand_written_sources_pattern_and_prefix(shards: str) -> None:
    stages = [{"stage": "open_object"}, {"stage": "untar"}]
    by_pattern = from_spec({"version": 1, "source": {"urls": f"{shards}/shard-{{000..003}}.tar"}, "stages": stages})
    by_prefix = from_spec({"version": 1, "source": {"prefix": f"{shards}/", "suffix": ".tar"}, "stages": stages})
    assert by_pattern.urls == by_prefix.urls == tuple(f"{shards}/shard-{s:03d}.tar" for s in range(SHARDS))
    assert by_prefix.to_spec()["source"] == {"urls": list(by_prefix.urls)}


@pytest.mark.parametrize(
    ("extend", "message"),
    [
        (lambda p: p.map(lambda s: s), r"stage 3 \(\.map\): .*<lambda> is not importable; define it at module level"),
        (lambda p: p.filter(Shouter().method), r"stage 3 \(\.filter\): Shouter\.method is not importable"),
        (lambda p: p.map(Shouter()), r"stage 3 \(\.map\): an instance of Shouter is not importable"),
        (
            lambda p: p.decode(handlers={"txt": lambda b: b}),
            r"stage 3 \(\.decode\) handler 'txt': .*<lambda> is not importable",
        ),
        (lambda p: p.map(functools.partial(key_of, object())), r"stage 3 \(\.map\) partial args: <object object"),
    ],
    ids=["lambda", "bound-method", "callable-object", "decoder-handler", "partial-with-object"],
)
def test_unserialisable_callables_are_refused_naming_the_stage(extend: Any, message: str) -> None:
    pipe = extend(sp.webdataset("memory://b/shard-{0..1}.tar", store=Store()))
    with pytest.raises(ConfigError, match=message):
        pipe.to_spec()
    assert pipe.spec_fingerprint() is None


def test_local_function_is_refused() -> None:
    def local(sample: Any) -> Any:
        return sample

    pipe = sp.from_urls("memory://b/0.tar", store=Store()).open_object().map(local)
    with pytest.raises(ConfigError, match=r"stage 1 \(\.map\): .*<locals>\.local is not importable"):
        pipe.to_spec()


BASE = {"version": 1, "source": {"urls": ["memory://b/0.tar"]}, "shuffle_shards": None}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"stage": "untar"}, {"stage": "unzip"}], r"stage 1: .*names no stage; choose one of open_object, untar"),
        (
            [{"stage": "shuffle", "bufer_size": 3}],
            r"stage 0 \(\.shuffle\): unknown argument\(s\) 'bufer_size'; its arguments are buffer_size, seed",
        ),
        ([{"stage": "shuffle"}], r"stage 0 \(\.shuffle\): missing a required argument: 'buffer_size'"),
        (
            [{"stage": "untar", "fast": True}],
            r"stage 0 \(\.untar\): unknown argument\(s\) 'fast'; its arguments are on_error",
        ),
        ([{"stage": "decode", "image": "jpeg"}], r"stage 0 \(\.decode\): image='jpeg' is not an image form"),
        ([{"stage": "map", "fn": "tests.nowhere:fn"}], r"stage 0 \(\.map\) fn: cannot import 'tests.nowhere:fn'"),
        ([{"stage": "map", "fn": "json:nope"}], r"stage 0 \(\.map\) fn: cannot import 'json:nope'"),
        ([{"stage": "filter", "predicate": "len"}], r'stage 0 \(\.filter\) predicate: .*write "module:qualname"'),
        ([{"stage": "checkpoint", "every": 2}], r"stage 0 \(\.checkpoint\): a spec holds no checkpoint sink"),
    ],
    ids=[
        "unknown-stage",
        "misspelt-arg",
        "missing-arg",
        "no-args",
        "bad-image",
        "no-module",
        "no-attribute",
        "no-colon",
        "ckpt",
    ],
)
def test_bad_specs_are_refused_naming_the_stage(stages: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_spec({**BASE, "stages": stages}, store=Store())


def test_not_a_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="not an s3pipes pipeline spec"):
        from_spec({**BASE, "version": 2, "stages": []}, store=Store())
    with pytest.raises(ConfigError, match="spec source"):
        from_spec({**BASE, "source": {"url": "memory://b/0.tar"}, "stages": []}, store=Store())
    with pytest.raises(ConfigError, match="is a mapping, not list"):
        from_spec("- a\n- b\n", store=Store())


def test_no_store_secret_in_a_spec() -> None:
    store = Store({"key": "AKIDEXAMPLE", "secret": "hunter2-secret", "endpoint_url": "http://127.0.0.1:9"})
    pipe = sp.webdataset("s3://bucket/shard-{0..2}.tar", store=store).decode().batch(2)
    text = json.dumps(pipe.to_spec()) + pipe.to_yaml()
    assert "AKID" not in text and "hunter2" not in text and "127.0.0.1" not in text


def test_checkpoint_sink_is_left_out_and_does_not_change_the_fingerprint(mem_root: str) -> None:
    pipe = sp.webdataset("memory://b/shard-{0..2}.tar", store=Store()).decode()
    with_sink = pipe.checkpoint(CheckpointStore(f"{mem_root}/ckpt"), every=5)
    assert with_sink.to_spec() == pipe.to_spec()
    assert with_sink.spec_fingerprint() == pipe.spec_fingerprint()


def test_fingerprint_ignores_speed_only_arguments_and_sees_the_rest() -> None:
    def fingerprint(**kwargs: Any) -> str | None:
        options = {"seed": 0, "workers": 0, "block_size": 1 << 20, "buffer": 10, **kwargs}
        pipe = sp.from_urls("memory://b/shard-{0..2}.tar", store=Store()).shuffle_shards(options["seed"])
        pipe = pipe.open_object(block_size=options["block_size"]).untar().group_by_key()
        return pipe.decode(workers=options["workers"]).shuffle(options["buffer"]).spec_fingerprint()

    assert fingerprint() == fingerprint(workers=4) == fingerprint(block_size=1 << 16)
    assert len({fingerprint(), fingerprint(seed=1), fingerprint(buffer=11)}) == 3
    spec = sp.from_urls("memory://b/0.tar", store=Store()).to_spec()
    assert spec_fingerprint(spec) != spec_fingerprint({**spec, "source": {"urls": ["memory://b/1.tar"]}})


def test_state_records_the_fingerprint_and_another_pipelines_state_is_refused(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/", shuffle_seed=0).decode().map(key_of)
    items = iter(pipe)
    first = [next(items) for _ in range(7)]
    state = pipe.state_dict()
    assert state["spec"] == pipe.spec_fingerprint() is not None

    other = sp.webdataset(f"{shards}/", shuffle_seed=1).decode().map(key_of)
    with pytest.raises(ValueError, match="this state belongs to another pipeline: it was saved by pipeline"):
        other.load_state_dict(state)

    faster = sp.webdataset(f"{shards}/", shuffle_seed=0).decode(workers=2).map(key_of)
    faster.load_state_dict(json.loads(json.dumps(state)))
    rest = list(faster)
    assert first + rest == list(sp.webdataset(f"{shards}/", shuffle_seed=0).decode().map(key_of))


def test_states_without_a_fingerprint_and_pipes_without_a_spec_are_not_checked(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/").map(key_of)
    items = iter(pipe)
    first = [next(items) for _ in range(3)]
    older = {k: v for k, v in pipe.state_dict().items() if k != "spec"}  # saved before fingerprints
    resumed = sp.webdataset(f"{shards}/").map(key_of)
    resumed.load_state_dict(older)
    assert first + list(resumed) == keys_in_order(shards)

    unspecced = sp.webdataset(f"{shards}/").map(lambda s: s["__key__"])
    assert unspecced.state_dict()["spec"] is None
    unspecced.load_state_dict(pipe.state_dict())  # this pipe has no fingerprint to compare
    assert first + list(unspecced) == keys_in_order(shards)


def keys_in_order(shards: str) -> list[str]:
    return [key_of(sample) for sample in sp.webdataset(f"{shards}/")]
