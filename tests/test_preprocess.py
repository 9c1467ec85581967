import numpy as np
import pyarrow as pa

from deepfm.data.preprocess import Preprocessor, fnv1a64
from deepfm.data.readers import from_arrow
from deepfm.schema import MISSING, OOV, Field, Schema


def _fit(schema, train, other=None):
    pre = Preprocessor(schema).fit(from_arrow(pa.table(train), schema))
    return pre, pre.transform(from_arrow(pa.table(other or train), schema))


def test_min_count_oov_and_missing():
    schema = Schema(fields=(Field("c", "categorical", min_count=2),), label="label")
    pre, enc = _fit(schema, {"c": ["a", "a", "a", "b", "b", "rare", None]},
                    {"c": ["a", "b", "rare", "unseen", None, ""]})
    # vocabulary ordered by count: a (3) -> 2, b (2) -> 3; rare (1 < min_count) is not in it
    assert pre.vocab("c") == ["a", "b"]
    assert enc.cat[:, 0].tolist() == [2, 3, OOV, OOV, MISSING, MISSING]
    assert pre.vocab_size(schema.fields[0]) == 4


def test_fit_uses_training_rows_only_and_vocab_ties_are_deterministic():
    schema = Schema(fields=(Field("c"),), label="label")
    pre, _ = _fit(schema, {"c": ["z", "y", "x", "x"]})
    assert pre.vocab("c") == ["x", "y", "z"]


def test_hash_buckets_need_no_vocabulary_and_are_stable():
    schema = Schema(fields=(Field("c", hash_buckets=10),), label="label")
    pre, enc = _fit(schema, {"c": ["a", "b", None]}, {"c": ["a", "never-seen", None]})
    assert "vocab" not in pre.states["c"]
    assert enc.cat[2, 0] == MISSING and 2 <= enc.cat[1, 0] < 12
    # FNV-1a 64 reference values
    h = fnv1a64(pa.array(["", "a", "foobar"]))
    assert h.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_numeric_transforms():
    schema = Schema(fields=(Field("l", "numeric", transform="log"), Field("s", "numeric", transform="standardize"),
                            Field("n", "numeric")), label="label")
    pre, enc = _fit(schema, {"l": [0.0, 9.0, -9.0, None], "s": [1.0, 3.0, None, 5.0], "n": [1.5, 2.0, 3.0, None]})
    np.testing.assert_allclose(enc.num[:3, 0], [0, np.log(10), -np.log(10)], rtol=1e-6)
    assert np.isnan(enc.num[3, 0])
    assert pre.states["s"]["mean"] == 3.0
    np.testing.assert_allclose(enc.num[[0, 1, 3], 1], np.array([-2, 0, 2]) / np.std([1, 3, 5]), rtol=1e-6)
    assert np.isnan(enc.num[2, 1]) and np.isnan(enc.num[3, 2])


def test_bucketize_turns_numeric_into_categorical():
    schema = Schema(fields=(Field("i", "numeric", transform="bucketize"),), label="label")
    pre, enc = _fit(schema, {"i": [0.0, 1.0, 2.0, 100.0, 100.0, -1.0, None]})
    assert schema.fields[0].encoded_kind == "cat" and enc.num.shape[1] == 0
    vocab = pre.vocab("i")
    assert str(int(np.floor(np.log(100) ** 2))) in vocab and "-1" in vocab
    assert enc.cat[3, 0] == enc.cat[4, 0] and enc.cat[6, 0] == MISSING


def test_multi_valued_offsets_truncation_and_missing():
    schema = Schema(fields=(Field("g", "multi", sep="|", max_len=2),), label="label")
    pre, enc = _fit(schema, {"g": ["a|b|c", "b", None, "a|zzz"]})
    off, vals = enc.multi["g"]
    assert off.tolist() == [0, 2, 3, 4, 6]
    v = {t: i + 2 for i, t in enumerate(pre.vocab("g"))}
    assert vals.tolist() == [v["a"], v["b"], v["b"], MISSING, v["a"], v["zzz"]]


def test_preprocessor_roundtrip_json():
    schema = Schema(fields=(Field("c"), Field("x", "numeric", transform="standardize")), label="label")
    pre, enc = _fit(schema, {"c": ["a", "b"], "x": [1.0, 2.0]})
    pre2 = Preprocessor.from_dict(pre.to_dict())
    enc2 = pre2.transform(from_arrow(pa.table({"c": ["a", "b"], "x": [1.0, 2.0]}), schema))
    np.testing.assert_array_equal(enc.cat, enc2.cat)
    np.testing.assert_array_equal(enc.num, enc2.num)
    assert pre.fingerprint() == pre2.fingerprint()


def test_fit_transform_equals_fit_then_transform():
    rng = np.random.default_rng(0)
    n = 3000
    vals = (rng.zipf(1.5, n) % 500).astype(str).astype(object)  # many values below min_count
    vals[rng.random(n) < 0.1] = None
    nums = rng.integers(0, 500, n).astype(float)
    table = pa.table({"c": pa.array(vals.tolist(), pa.string()), "x": nums, "b": nums,
                      "y": rng.integers(0, 2, n)})
    schema = Schema(fields=(Field("c", "categorical", min_count=5), Field("x", "numeric", transform="log"),
                            Field("b", "numeric", transform="bucketize", min_count=3)), label="y")
    data = from_arrow(table, schema)
    a = Preprocessor(schema).fit(data)
    enc_a = a.transform(data)
    b = Preprocessor(schema)
    enc_b = b.fit_transform(data)
    assert a.to_dict() == b.to_dict()
    assert (enc_a.cat == OOV).any() and (enc_a.cat == MISSING).any()
    np.testing.assert_array_equal(enc_a.cat, enc_b.cat)
    np.testing.assert_array_equal(enc_a.num, enc_b.num)
