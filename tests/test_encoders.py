"""Every encoder's value path (one Python value, the server's) equals its column path (Arrow, the batch's),
value by value, for every field kind: missing, unseen, empty tokens in multi values, huge numbers, hashing."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfm.data.encoders import (
    BucketEncoder,
    CategoricalEncoder,
    HashedEncoder,
    MultiEncoder,
    NumericEncoder,
    encoder_for,
    fnv1a64,
    fnv1a64_str,
)
from deepfm.data.preprocess import Preprocessor
from deepfm.schema import MISSING, OOV, Field, Schema

TOKENS = ["a", "b", "dd", "ünï", "v1", "x" * 300, "\u20ac", "0", "-1", "a b", "NULL"]
NUMBERS = [0.0, -0.0, 0.5, 1.0, 2.0, 2.5, 3.0, -3.7, 1e-300, 1e15, -1e15, 1e300, -1e300, 1.7e308, -1.7e308,
           3.4e38, 3.5e38, -9.3e18, 9.3e18, 123456.789, None, math.nan]
MULTI = ["a|b", "a||b", "|", "||", "", "a|", "|a", "a|b|c|dd|e", "unseen|a", "ünï|ünï", None, "a b|c"]

FIELDS = [
    Field("c", "categorical", min_count=1), Field("c2", "categorical", min_count=2),
    Field("h", "categorical", hash_buckets=13),
    Field("n", "numeric"), Field("lg", "numeric", transform="log"), Field("s", "numeric", transform="standardize"),
    Field("b", "numeric", transform="bucketize"),
    Field("m", "multi", max_len=3, pooling="mean"), Field("ms", "multi", sep=" ", max_len=2, pooling="sum"),
    Field("mh", "multi", hash_buckets=7, max_len=4),
]


def _fitted(f: Field):
    if f.kind == "numeric":
        col = pa.array([1.0, 5.0, 30.0, -2.0, None, 7.5, 7.5, 1e6], pa.float64())
    elif f.kind == "multi":
        col = pa.array(["a|b", "a", "b|dd", None, "a b|c", "ünï"] if f.sep == "|" else ["a b", "b", "a dd c", None])
    else:
        col = pa.array(["a", "a", "b", "dd", None, "ünï", "v1", "v1"])
    return encoder_for(f).fit(col)


def _arrow(f: Field, values: list) -> pa.Array:
    if f.kind == "numeric":
        return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values],
                        pa.float64())
    return pa.array(values, pa.string())


def _corpus(f: Field) -> list:
    if f.kind == "numeric":
        return NUMBERS
    if f.kind == "multi":
        return MULTI + TOKENS
    return [*TOKENS, None, ""]  # "" is not missing here: readers and serve.records make it None first


def _same(enc, values: list) -> None:
    col_idx, col_val = enc.encode_column(_arrow(enc.field, values))
    vals_idx, vals_val = enc.encode_values(values)
    assert col_idx.shape == (len(values), enc.slots) and col_idx.dtype == np.int64
    assert col_val.dtype == np.float32
    np.testing.assert_array_equal(vals_idx, col_idx)
    np.testing.assert_array_equal(vals_val, col_val)
    with np.errstate(over="ignore"):
        for r, v in enumerate(values):  # one value at a time: a column of one
            idx, val = enc.encode_value(v)
            one_idx, one_val = enc.encode_column(_arrow(enc.field, [v]))
            np.testing.assert_array_equal(idx, one_idx[0], err_msg=f"{enc.field.name}: {v!r}")
            np.testing.assert_array_equal(val, one_val[0], err_msg=f"{enc.field.name}: {v!r}")
            np.testing.assert_array_equal(idx, col_idx[r], err_msg=f"{enc.field.name}: {v!r}")


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_value_path_equals_column_path_on_a_hostile_corpus(f):
    with np.errstate(over="ignore"):
        _same(_fitted(f), _corpus(f))


def test_encoder_kinds_and_reserved_indices():
    kinds = {f.name: type(encoder_for(f)) for f in FIELDS}
    assert kinds["c"] is CategoricalEncoder and kinds["h"] is HashedEncoder and kinds["n"] is NumericEncoder
    assert kinds["b"] is BucketEncoder and kinds["m"] is MultiEncoder and kinds["mh"] is MultiEncoder
    c = _fitted(FIELDS[0])
    assert c.encode_value(None)[0][0] == MISSING and c.encode_value("never")[0][0] == OOV
    assert c.encode_value("a")[0][0] == 2  # the most frequent value
    h = _fitted(FIELDS[2])
    assert h.encode_value("h3")[0][0] == 2 + fnv1a64_str("h3") % 13
    assert int(fnv1a64(pa.array(["h3"]))[0]) == fnv1a64_str("h3")
    n = _fitted(FIELDS[3])
    assert n.encode_value(None) == n.encode_value(math.nan)
    assert list(n.encode_value(None)[0]) == [1] and list(n.encode_value(2.5)[1]) == [2.5]
    m = _fitted(FIELDS[7])  # max_len 3, mean pooling; a list is already split
    assert m.encode_value(["a", "b"])[0].tolist() == m.encode_value("a|b")[0].tolist()
    assert m.encode_value("a|b")[1].tolist() == [0.5, 0.5, 0.0]
    assert m.encode_value([])[0].tolist() == m.encode_value(None)[0].tolist() == [MISSING] * 3


def test_huge_negative_bucket_is_the_int64_minimum_on_both_paths():
    """floor(-1e300) does not fit an int64: the column path's cast gives -2^63, and so must the value path
    (it used to spell out all 301 digits, so a value seen in training scored as OOV online)."""
    b = BucketEncoder(Field("b", "numeric", transform="bucketize")).fit(pa.array([-1e300, -1e19, 5.0]))
    assert b.vocab.to_pylist()[0] == str(-(2 ** 63))
    assert b.encode_value(-1e300)[0][0] == b.encode_value(-1e19)[0][0] == 2


def test_state_roundtrip_is_the_preprocessor_json_entry():
    schema = Schema(fields=tuple(FIELDS), label="y")
    for f in FIELDS:
        enc = _fitted(f)
        d = enc.to_dict()
        assert "_vocab_array" not in d
        back = type(enc).from_dict(f, d)
        assert type(back) is type(enc) and back.to_dict() == d
        _same(back, _corpus(f)[:6])
    pre = Preprocessor(schema, {f.name: _fitted(f).to_dict() for f in FIELDS})
    assert Preprocessor.from_dict(pre.to_dict()).to_dict() == pre.to_dict()


_token = st.one_of(st.none(), st.sampled_from(TOKENS + ["unseen", ""]), st.text(max_size=6))
_number = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False), st.sampled_from(NUMBERS[:-2]))
_multi = st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "", "dd", "zz", "ünï", "a b"]), max_size=6)
                   .map("|".join), st.text(alphabet="ab| ", max_size=8))


@settings(max_examples=60, deadline=None)
@given(st.lists(_token, min_size=1, max_size=8), st.lists(_number, min_size=1, max_size=8),
       st.lists(_multi, min_size=1, max_size=8))
def test_value_path_equals_column_path_property(tokens, numbers, multis):
    with np.errstate(over="ignore"):
        for f in FIELDS:
            values = numbers if f.kind == "numeric" else multis if f.kind == "multi" else tokens
            if f.hash_buckets is not None or f.kind != "categorical":
                values = [v for v in values if not (isinstance(v, str) and "\x00" in v)]
            _same(_fitted(f), values or [None])
