"""The streaming pipeline against SeaweedFS: DataLoader workers, StatefulDataLoader resume."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import s3pipes as sp
from s3pipes import Store
from tests.contract import assert_disjoint_cover
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration


def test_two_workers_stream_every_sample_once(s3_store: Store, s3_root: str) -> None:
    write_shards(s3_root, shards=6, per_shard=5, store=s3_store)
    pipe = sp.webdataset(f"{s3_root}/", shuffle_seed=0, store=s3_store).decode("torch").map(lambda s: s["__key__"])
    got = list(DataLoader(pipe, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    assert_disjoint_cover([got], [f"sample{n:04d}" for n in range(30)])


def test_stateful_dataloader_resumes_mid_epoch_with_two_workers(s3_store: Store, s3_root: str) -> None:
    write_shards(s3_root, shards=6, per_shard=5, store=s3_store)

    def loader() -> StatefulDataLoader:
        pipe = sp.webdataset(f"{s3_root}/", shuffle_seed=2, store=s3_store).map(lambda s: s["__key__"])
        return StatefulDataLoader(pipe, batch_size=3, num_workers=2, multiprocessing_context="fork")

    everything = list(loader())
    first = loader()
    seen = []
    for i, batch in enumerate(first):
        seen.append(batch)
        if i == 3:
            state = first.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert seen + rest == everything
