"""Declarative pipeline specs: a Pipe as plain data (dict / YAML / JSON), and back.

A spec holds only ``str``/``int``/``float``/``bool``/``None``/``list``/``dict``, so a
training config can carry its data pipeline and a checkpoint can record which
pipeline its data position belongs to::

    {"version": 1,
     "source": {"urls": ["s3://b/train/shard-000.tar", ...]},
     "shuffle_shards": 0,                         # the shard seed, or None
     "stages": [{"stage": "open_object", "block_size": 8388608, "ahead": 4},
                {"stage": "untar"},
                {"stage": "group_by_key"},
                {"stage": "decode", "image": "pil", "workers": 2, "handlers": {}, "max_image_pixels": 89478485},
                {"stage": "map", "fn": "mypkg.transforms:augment", "workers": 0},
                {"stage": "shuffle", "buffer_size": 1000, "seed": 0},
                {"stage": "batch", "batch_size": 32, "collate": "torch.utils.data:default_collate",
                 "drop_last": False}]}

Each stage is its :class:`~s3pipes.pipe.Pipe` method's name and arguments, all of them
(:func:`to_spec` writes defaults too, so a spec is canonical). Callables are written as
``"module:qualname"`` and must be importable: module-level functions and classes,
methods of importable classes (``"builtins:str.upper"``), or a ``functools.partial`` of
one with plain arguments, written ``{"partial": "module:qualname", "args": [...],
"kwargs": {...}}``. A lambda, a local function, a bound method or a callable object
raises :class:`~s3pipes.errors.ConfigError` naming the stage. A
:class:`~s3pipes.decode.Decoder` is written as its ``decode`` stage.

Not in a spec:

- the :class:`~s3pipes.store.Store` (no credentials ever): :func:`from_spec` takes ``store=``.
- the epoch: it is the position's, and ``state_dict()`` holds it.
- ``.checkpoint(store, every=...)``: a sink that saves, not part of the data. It is left
  out; add it again to the pipe :func:`from_spec` returns.

The source is the shard plan's URL list (``list_prefix`` lists once, when the pipe is
built, and the plan keeps the URLs). A hand-written spec may give instead
``{"urls": "s3://b/shard-{000..099}.tar"}`` (one brace pattern) or ``{"prefix": "s3://b/train/",
"suffix": ".tar"}`` (listed by :func:`from_spec`); :func:`to_spec` of the result writes the URLs.
URLs are written as given: a presigned URL's signature would be in the spec.

Fingerprint (:func:`spec_fingerprint`): the first 16 hex digits of the sha256 of the spec as
canonical JSON (sorted keys, no spaces), without the arguments that only change speed, not
the items or their order: ``workers`` (map and decode run in order on any number of threads)
and ``open_object``'s ``block_size`` and ``ahead``. ``Pipe.state_dict()`` records it, and
``Pipe.load_state_dict()`` refuses a state recorded by a pipeline with another fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from s3pipes.decode import Decoder
from s3pipes.errors import ConfigError
from s3pipes.pipe import Pipe, _method_name, from_urls, list_prefix
from s3pipes.stages.shards import ShardPlan
from s3pipes.stages.sink import CheckpointSink
from s3pipes.stages.transform import Map
from s3pipes.store import Store

__all__ = ["SPEC_VERSION", "from_spec", "spec_fingerprint", "to_spec"]

#: The ``"version"`` of the specs written here.
SPEC_VERSION = 1
#: Stage arguments that hold callables.
_CALLABLE_ARGS = frozenset({"fn", "predicate", "collate"})
#: Stage arguments that change speed only: left out of the fingerprint.
_SPEED_ARGS = frozenset({"workers", "block_size", "ahead"})
_STAGES = ("open_object", "untar", "group_by_key", "decode", "map", "filter", "shuffle", "batch")
_SOURCE_KEYS = ({"urls"}, {"prefix"}, {"prefix", "suffix"})


# -- Pipe -> spec ------------------------------------------------------------------------------


def to_spec(pipe: Pipe[Any]) -> dict[str, Any]:
    """The spec of ``pipe`` (what ``pipe.to_spec()`` returns); the module docstring has the format.

    Raises:
        ConfigError: a stage holds a callable that is not importable, or an argument that is not plain
            data; the message names the stage.
    """
    plan = pipe._plan
    stages: list[dict[str, Any]] = []
    for index, (cls, kwargs) in enumerate(pipe._steps):
        if cls is CheckpointSink:
            continue  # a sink, not data: see the module docstring
        method = _method_name(cls)
        where = f"stage {index} (.{method})"
        fn = kwargs.get("fn")
        if method == "map" and isinstance(fn, Decoder):
            where = f"stage {index} (.decode)"
            stage_spec = {"stage": "decode", **_decoder_args(fn, where), "workers": kwargs.get("workers", 0)}
            stages.append(stage_spec | ({"on_error": kwargs["on_error"]} if "on_error" in kwargs else {}))
            continue
        stage: dict[str, Any] = {"stage": method}
        for name, value in kwargs.items():
            stage[name] = _callable_ref(value, where) if name in _CALLABLE_ARGS else _plain(value, f"{where} {name}")
        if method == "map":
            stage["workers"] = 0 if cls is Map else kwargs["workers"]
        stages.append(stage)
    source: dict[str, Any] = {"urls": list(plan.urls)}
    spec: dict[str, Any] = {"version": SPEC_VERSION, "source": source, "shuffle_shards": plan.seed, "stages": stages}
    if not plan.split:
        spec["split"] = False
    return spec


def spec_fingerprint(spec: Mapping[str, Any]) -> str:
    """16 hex digits naming what a spec yields: its canonical JSON's sha256, without speed-only arguments.

    Example:
        >>> spec = {"version": 1, "source": {"urls": ["memory://b/0.tar"]}, "shuffle_shards": None,
        ...         "stages": [{"stage": "open_object", "block_size": 1024}, {"stage": "untar"}]}
        >>> faster = {**spec, "stages": [{"stage": "open_object", "block_size": 8 << 20}, {"stage": "untar"}]}
        >>> spec_fingerprint(spec) == spec_fingerprint(faster), len(spec_fingerprint(spec))
        (True, 16)
        >>> spec_fingerprint(spec) == spec_fingerprint({**spec, "shuffle_shards": 0})
        False
    """
    stages = [{k: v for k, v in stage.items() if k not in _SPEED_ARGS} for stage in spec["stages"]]
    canonical = json.dumps({**spec, "stages": stages}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def to_yaml(spec: Mapping[str, Any]) -> str:
    """The spec as YAML text, keys in spec order."""
    import yaml  # type: ignore[import-untyped]

    return str(yaml.safe_dump(dict(spec), sort_keys=False))


def _decoder_args(decoder: Decoder, where: str) -> dict[str, Any]:
    handlers = {name: _callable_ref(fn, f"{where} handler {name!r}") for name, fn in decoder._handlers.items()}
    return {"image": decoder._image, "handlers": handlers, "max_image_pixels": decoder._max_pixels}


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data (JSON-able, dict keys str), else ConfigError."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list):
        return [_plain(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _plain(item, where) for key, item in value.items()}
    raise ConfigError(
        f"{where}: {value!r} ({type(value).__name__}) is not plain data; "
        "a spec holds only str, int, float, bool, None, list and dict with str keys"
    )


def _callable_ref(fn: Any, where: str) -> Any:
    """``"module:qualname"`` for an importable callable, a partial's dict, None for None; else ConfigError."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return {
            "partial": _callable_ref(fn.func, where),
            "args": _plain(list(fn.args), f"{where} partial args"),
            "kwargs": _plain(dict(fn.keywords), f"{where} partial kwargs"),
        }
    qualname = getattr(fn, "__qualname__", None)
    owner = getattr(fn, "__objclass__", None)  # a method descriptor (str.upper) has no __module__
    module = getattr(fn, "__module__", None) or getattr(owner, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        kind = f"an instance of {type(fn).__qualname__}"
        raise ConfigError(f"{where}: {kind} is not importable; pass a module-level function or class instead")
    found = _lookup(module, qualname)
    if "<" in qualname or module == "__main__" or (found is not fn and found != fn):  # == for cls.classmethod
        fix = "move it to an importable module" if module == "__main__" else "define it at module level"
        raise ConfigError(f"{where}: {qualname} is not importable; {fix}")
    return f"{_shortest_module(module, qualname, fn)}:{qualname}"


def _lookup(module: str, qualname: str) -> Any:
    """The object at ``module:qualname`` among the modules already imported, or None."""
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _shortest_module(module: str, qualname: str, fn: Any) -> str:
    """The shortest parent package exporting the same object (``torch.utils.data``, not ``..._utils.collate``)."""
    parts = module.split(".")
    for end in range(1, len(parts)):
        parent = ".".join(parts[:end])
        found = _lookup(parent, qualname)
        if found is fn:
            return parent
    return module


# -- spec -> Pipe ------------------------------------------------------------------------------


def from_spec(spec: Mapping[str, Any] | str | os.PathLike[str], *, store: Store | None = None) -> Pipe[Any]:
    """Build the Pipe a spec describes: the same items, in the same order, as the pipe it came from.

    Args:
        spec: a spec dict, YAML text, or the path of a ``.yaml``/``.yml``/``.json`` file holding one.
        store: the store to read shards with (a spec holds none); default ``Store.from_env()``.

    Returns:
        A :class:`~s3pipes.pipe.Pipe`; ``pipe.to_spec()`` equals ``spec`` when ``spec`` came from ``to_spec()``.

    Raises:
        ConfigError: not a spec, an unknown stage, bad stage arguments, or a callable that cannot be
            imported; the message names the stage.

    Example:
        >>> store = Store()
        >>> store.write_bytes("memory://doc-spec/a.txt", b"")
        >>> spec = {"version": 1, "source": {"urls": ["memory://doc-spec/a.txt"]}, "shuffle_shards": None,
        ...         "stages": [{"stage": "map", "fn": "builtins:str.upper", "workers": 0}]}
        >>> pipe = from_spec(spec, store=store)
        >>> list(pipe), pipe.to_spec() == spec
        (['MEMORY://DOC-SPEC/A.TXT'], True)
    """
    data = _load(spec)
    unknown = set(data) - {"version", "source", "shuffle_shards", "stages", "split"}
    if data.get("version") != SPEC_VERSION or unknown or not {"source", "stages"} <= set(data):
        raise ConfigError(
            f"not an s3pipes pipeline spec (version {data.get('version')!r}, keys {sorted(data)}): "
            f"expected version {SPEC_VERSION} with keys source, stages and optionally shuffle_shards, split"
        )
    seed, split, stages = data.get("shuffle_shards"), data.get("split", True), data["stages"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"spec shuffle_shards={seed!r} must be an int seed, or None to keep the shard order")
    if not isinstance(split, bool) or not isinstance(stages, list):
        raise ConfigError(f"spec split={split!r} must be a bool and stages a list (got {type(stages).__name__})")
    store = store if store is not None else Store.from_env()
    pipe: Pipe[Any] = Pipe(ShardPlan(_source_urls(data["source"], store), seed=seed, split=split), store)
    for index, stage in enumerate(stages):
        pipe = _add_stage(pipe, index, stage)
    return pipe


def _source_urls(source: Any, store: Store) -> tuple[str, ...]:
    if isinstance(source, Mapping) and set(source) in _SOURCE_KEYS:
        if "prefix" in source:
            return list_prefix(source["prefix"], suffix=source.get("suffix", ""), store=store).urls
        urls = source["urls"]
        if isinstance(urls, str):
            return from_urls(urls, store=store).urls
        if isinstance(urls, list) and urls and all(isinstance(url, str) for url in urls):
            return tuple(urls)
    raise ConfigError(
        f"spec source {source!r}: give {{'urls': [url, ...]}}, {{'urls': 'brace-{{0..9}}-pattern'}} "
        "or {'prefix': url, 'suffix': '.tar'}"
    )


def _load(spec: Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    if isinstance(spec, Mapping):
        return spec
    import yaml

    text = str(spec)
    if isinstance(spec, os.PathLike) or (text.endswith((".yaml", ".yml", ".json")) and "\n" not in text):
        text = Path(spec).read_text(encoding="utf-8")  # JSON is YAML
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the pipeline spec is not valid YAML or JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"a pipeline spec is a mapping, not {type(data).__name__}: {text[:80]!r}")
    return data


def _add_stage(pipe: Pipe[Any], index: int, stage: Any) -> Pipe[Any]:
    name = stage.get("stage") if isinstance(stage, Mapping) else None
    where = f"stage {index} (.{name})"
    if name == "checkpoint":
        raise ConfigError(f"{where}: a spec holds no checkpoint sink; add .checkpoint(store, every=...) to the pipe")
    if name not in _STAGES:
        raise ConfigError(f"stage {index}: {stage!r} names no stage; choose one of {', '.join(_STAGES)}")
    kwargs = {key: value for key, value in stage.items() if key != "stage"}
    for key in _CALLABLE_ARGS & set(kwargs):
        kwargs[key] = _resolve(kwargs[key], f"{where} {key}")
    if name == "decode" and isinstance(kwargs.get("handlers"), Mapping):
        kwargs["handlers"] = {k: _resolve(v, f"{where} handler {k!r}") for k, v in kwargs["handlers"].items()}
    method: Callable[..., Any] = getattr(pipe, name)
    parameters = inspect.signature(method).parameters
    named = [p for p in parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    takes = f"its arguments are {', '.join(p.name for p in named) or 'none'}"
    unknown = set(kwargs) - set(parameters)
    if unknown and len(named) == len(parameters):
        raise ConfigError(f"{where}: unknown argument(s) {', '.join(map(repr, sorted(unknown)))}; {takes}")
    try:
        inspect.signature(method).bind(**kwargs)
        result: Pipe[Any] = method(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}; {takes}") from exc
    return result


def _resolve(ref: Any, where: str) -> Any:
    """The callable a ``"module:qualname"`` (or partial dict, or None) names."""
    if ref is None:
        return None
    if isinstance(ref, Mapping) and set(ref) <= {"partial", "args", "kwargs"} and "partial" in ref:
        return functools.partial(_resolve(ref["partial"], where), *ref.get("args", []), **ref.get("kwargs", {}))
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f'{where}: {ref!r} is not a callable reference; write "module:qualname"')
    module, qualname = ref.split(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {ref!r} ({type(exc).__name__}: {exc})") from exc
    if not callable(obj):
        raise ConfigError(f"{where}: {ref!r} is a {type(obj).__name__}, not a callable")
    return obj
