"""Out-of-core data: the streaming fit equals the in-memory fit, shards hold exactly the encoded rows,
epochs visit every row once shard by shard, and training from shards works (and resumes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv.write_csv)
import pytest
import torch
from safetensors.torch import load_file

from deepfm import pipeline
from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.data.shards import ShardBatcher, ShardSet, fit_streaming, valid_mask, write_shards
from deepfm.data.store import Batcher, layout
from deepfm.errors import DataError
from deepfm.schema import Field, Schema

MIXED = Schema(fields=(
    Field("c", "categorical", min_count=2), Field("h", "categorical", hash_buckets=31),
    Field("n", "numeric", transform="log"), Field("s", "numeric", transform="standardize"),
    Field("b", "numeric", transform="bucketize", min_count=2),
    Field("tags", "multi", sep="|", max_len=3, pooling="mean", min_count=2),
), label="y")


def _mixed(tmp_path, n=5000, seed=0):
    rng = np.random.default_rng(seed)
    words = np.array(["a", "b", "c", "d", "e", "f", "g"])
    t = pa.table({
        "y": rng.integers(0, 2, n).astype(float),
        "c": [f"v{k}" if k % 11 else None for k in rng.zipf(1.3, n) % 300],
        "h": [f"h{k}" for k in rng.integers(0, 500, n)],
        "n": rng.normal(0, 30, n).round(1),
        "s": rng.normal(5, 2, n),
        "b": rng.exponential(20, n).round(),
        "tags": ["|".join(rng.choice(words, rng.integers(0, 5))) for _ in range(n)],
    })
    path = tmp_path / "mixed.csv"
    path.write_text(",".join(t.column_names) + "\n")
    with open(path, "ab") as fh:
        pa.csv.write_csv(t, fh, pa.csv.WriteOptions(include_header=False, quoting_style="none"))
    return path


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_streaming_fit_equals_in_memory_fit(tmp_path, fraction):

    path = _mixed(tmp_path)
    pre, info = fit_streaming(lambda: readers.iter_read(path, "csv", MIXED, block_bytes=20_000), MIXED, fraction, 3)
    whole = readers.read(path, "csv", MIXED)
    keep = ~valid_mask(0, whole.rows, fraction, 3)
    assert info["train_rows"] == int(keep.sum()) and info["rows"] == whole.rows
    ref = Preprocessor(MIXED).fit(readers.ReadResult(whole.table.filter(pa.array(keep)), whole.label[keep],
                                                     MIXED, str(path), whole.skipped))
    for f in MIXED.fields:
        if f.encoded_kind in ("cat", "multi") and f.hash_buckets is None:
            assert pre.vocab(f.name) == ref.vocab(f.name), f.name
    assert pre.states["s"]["mean"] == pytest.approx(ref.states["s"]["mean"], rel=1e-12)
    assert pre.states["s"]["std"] == pytest.approx(ref.states["s"]["std"], rel=1e-12)


def test_valid_mask_is_blockwise_consistent_and_near_the_fraction():
    whole = valid_mask(0, 100_000, 0.1, 7)
    parts = np.concatenate([valid_mask(s, 10_000, 0.1, 7) for s in range(0, 100_000, 10_000)])
    np.testing.assert_array_equal(whole, parts)
    assert abs(whole.mean() - 0.1) < 0.005
    assert not np.array_equal(whole, valid_mask(0, 100_000, 0.1, 8))


def test_shards_hold_the_encoded_rows_and_batch_like_memory(tmp_path):

    path = _mixed(tmp_path, n=3000)
    pre = Preprocessor(MIXED).fit(readers.read(path, "csv", MIXED))
    manifest = write_shards(readers.iter_read(path, "csv", MIXED, block_bytes=10_000), pre, tmp_path / "sh",
                            0.0, 0, shard_rows=700)
    assert manifest["train"] == [700, 700, 700, 700, 200]
    shards = ShardSet.open(tmp_path / "sh", "train")
    fields = layout(pre)
    mem = Batcher(pre.transform(readers.read(path, "csv", MIXED)), fields)
    sb = ShardBatcher(shards, fields)
    rows = np.sort(np.random.default_rng(0).choice(3000, 900, replace=False))
    for a, b in zip(sb(rows), mem(rows), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(sb.labels(), mem.labels())
    order = sb.epoch_order(np.random.default_rng(1))
    assert np.array_equal(np.sort(order), np.arange(3000))
    assert (np.diff(np.searchsorted(shards.starts, order, side="right")) != 0).sum() == 4  # shard by shard
    # a missing shard is a clear error naming it
    shutil.rmtree(tmp_path / "sh" / "train" / "shard-00002")
    with pytest.raises(DataError, match="shard-00002"):
        ShardBatcher(shards, fields)(np.array([1500]))


def test_train_streaming_matches_cli_and_resumes(synth_small, tmp_path, monkeypatch):
    overrides = ["model.hidden=[16]", "train.batch_size=256", "train.epochs=2", "train.checkpoint_every=5"]
    prep = pipeline.prepare_streaming(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv",
                                      use_cache=True, cache_dir=tmp_path / "cache", shard_rows=1000,
                                      block_bytes=100_000)
    assert isinstance(prep.train, ShardSet) and len(prep.train.sizes) > 3
    mc, tc = pipeline.resolve_config("default", overrides)
    _, ref = pipeline.train(prep, mc, tc, tmp_path / "a", "criteo", progress=False)
    assert ref["metrics"]["valid"]["auc"] > 0.6
    # interrupted after the 3rd checkpoint, then resumed: identical (shard order and permutations included)
    from deepfm.train import checkpoint as ck

    real, calls = ck.Checkpointer.save, []

    def save(self, *a, **k):
        calls.append(real(self, *a, **k))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(ck.Checkpointer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(prep, mc, tc, tmp_path / "b", "criteo", progress=False)
    monkeypatch.undo()
    pipeline.train(prep, mc, tc, tmp_path / "b", "criteo", progress=False, resume=True)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "b" / "metrics.json").read_text())


def test_hash_everything_schema_needs_no_vocabulary(tmp_path):
    from deepfm.data.infer import infer_schema

    path = _mixed(tmp_path, n=2000)
    schema = infer_schema(path, label="y", hash_buckets=64)
    assert all(f.hash_buckets == 64 for f in schema.fields if f.kind != "numeric")
    assert any(f.kind == "numeric" and f.hash_buckets is None for f in schema.fields)
    pre, info = fit_streaming(lambda: readers.iter_read(path, "csv", schema), schema, 0.1, 0)
    assert all("_vocab_array" not in st for st in pre.states.values())
    enc = pre.transform(readers.read(path, "csv", schema))
    assert enc.cat.max() < 2 + 64 and info["rows"] == 2000


def test_hash_collisions_are_counted_alike_in_memory_and_streaming(tmp_path):
    path = _mixed(tmp_path, n=3000)
    schema = Schema(fields=(Field("h", "categorical", hash_buckets=31), Field("n", "numeric")), label="y")
    mem = Preprocessor(schema).fit(readers.read(path, "csv", schema)).states["h"]
    stream = fit_streaming(lambda: readers.iter_read(path, "csv", schema, block_bytes=8000), schema)[0].states["h"]
    assert mem == stream
    assert mem["distinct_values"] > 31 and mem["buckets_used"] <= 31
    assert mem["collisions"] == mem["distinct_values"] - mem["buckets_used"] > 0
