"""Readers: every public format loads, and bad input gets a clear error (file, line, field) or a counted
skip under on_bad_rows='skip'."""

import gzip

import numpy as np
import pytest

from deepfm.data import readers
from deepfm.errors import DataError, SchemaError

from .conftest import shared, write


def crow(label="0", ints=None, cats=None):
    ints = ints if ints is not None else ["1", "", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
    cats = cats if cats is not None else ["68fd1e64", "80e26c9b", ""] + [f"{i:08x}" for i in range(23)]
    return "\t".join([label, *ints, *cats])


def criteo_file(tmp_path, lines, name="c.tsv", crlf=False):
    sep = "\r\n" if crlf else "\n"
    return write(tmp_path / name, sep.join(lines) + sep)


def expect(exc_info, *needles):
    msg = str(exc_info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_criteo_reads_values_missing_and_labels(tmp_path):
    p = criteo_file(tmp_path, [crow("1"), crow("0")])
    r = readers.read(p, "criteo")
    assert r.rows == 2 and r.label.tolist() == [1.0, 0.0]
    assert r.table.column("I2").to_pylist() == [None, None]  # empty -> missing
    assert r.table.column("C3").to_pylist() == [None, None]
    assert r.table.column("I5").to_pylist() == [1382.0, 1382.0]


def test_crlf_line_ends_are_read_like_lf(tmp_path):
    a = readers.read(criteo_file(tmp_path, [crow("1"), crow("0")], "a.tsv"), "criteo")
    b = readers.read(criteo_file(tmp_path, [crow("1"), crow("0")], "b.tsv", crlf=True), "criteo")
    assert a.table.equals(b.table) and a.label.tolist() == b.label.tolist()


def test_gzip_input_and_truncated_gzip(tmp_path):
    data = ("\n".join([crow("1")] * 500) + "\n").encode()
    p = tmp_path / "c.tsv.gz"
    p.write_bytes(gzip.compress(data))
    assert readers.read(p, "criteo").rows == 500
    t = tmp_path / "t.tsv.gz"
    t.write_bytes(gzip.compress(data)[:-40])
    with pytest.raises(DataError) as e:
        readers.read(t, "criteo")
    expect(e, "t.tsv.gz")


def test_wrong_column_count_names_line(tmp_path):
    p = criteo_file(tmp_path, [crow("1"), crow("0"), "1\t2\t3", crow("0")])
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "c.tsv", "line 3", "expected 40 columns, found 3")
    assert e.value.line == 3


def test_wrong_column_count_skip_counts_and_keeps_line_numbers(tmp_path):
    p = criteo_file(tmp_path, [crow("1"), "x", crow("0"), crow("0", ints=["a"] + [""] * 12)])
    r = readers.read(p, "criteo", on_bad_rows="skip")
    assert r.rows == 2 and r.skipped.count == 2
    assert "line 2" in r.skipped.examples[0] and "line 4" in r.skipped.examples[1] and "I1" in r.skipped.examples[1]


def test_non_numeric_text_in_numeric_field(tmp_path):
    ints = ["1", "abc"] + [""] * 11
    p = criteo_file(tmp_path, [crow("1"), crow("0", ints=ints)])
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "line 2", "field 'I2'", "not a number: 'abc'")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_nan_and_inf_rejected(tmp_path, bad):
    ints = ["1", bad] + [""] * 11
    p = criteo_file(tmp_path, [crow("0", ints=ints)])
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "line 1", "'I2'")


@pytest.mark.parametrize("label", ["2", "-1", "yes", ""])
def test_labels_outside_0_1(tmp_path, label):
    p = criteo_file(tmp_path, [crow("1"), crow(label)])
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "line 2", "'label'")


def test_bad_label_skip(tmp_path):
    p = criteo_file(tmp_path, [crow("1"), crow("7"), crow("0")])
    r = readers.read(p, "criteo", on_bad_rows="skip")
    assert r.rows == 2 and r.skipped.count == 1 and r.label.tolist() == [1.0, 0.0]


def test_empty_file_and_header_only(tmp_path):
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "e.tsv", ""), "criteo")
    expect(e, "e.tsv", "empty")
    from deepfm.schema import Field, Schema

    s = Schema(fields=(Field("a"),), label="y")
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "h.csv", "y,a\n"), "csv", s)
    expect(e, "h.csv", "no data rows")


def test_invalid_utf8_names_line_and_field_or_skips(tmp_path):
    cats = ["68fd1e64", "\udcff"] + [f"{i:08x}" for i in range(24)]
    bad = crow("0", cats=cats).encode("utf-8", "surrogateescape")
    p = write(tmp_path / "u.tsv", crow("1").encode() + b"\n" + bad + b"\n" + crow("0").encode() + b"\n")
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "line 2", "'C2'", "UTF-8")
    r = readers.read(p, "criteo", on_bad_rows="skip")
    assert r.rows == 2 and r.skipped.count == 1


def test_nul_byte_is_reported(tmp_path):
    cats = ["68fd\x0064"] + [f"{i:08x}" for i in range(25)]
    p = criteo_file(tmp_path, [crow("0", cats=cats)])
    with pytest.raises(DataError) as e:
        readers.read(p, "criteo")
    expect(e, "NUL", "'C1'")


def test_missing_schema_column(tmp_path):
    from deepfm.schema import Field, Schema

    s = Schema(fields=(Field("a"), Field("b")), label="y")
    p = write(tmp_path / "d.csv", "y,a\n1,x\n0,z\n")
    with pytest.raises(DataError) as e:
        readers.read(p, "csv", s)
    expect(e, "d.csv", "column 'b' required by the schema is missing")


def test_csv_needs_schema_and_reads_quoted_values(tmp_path):
    from deepfm.schema import Field, Schema

    p = write(tmp_path / "d.csv", 'y,a,x\n1,"hello, world",1.5\n0,b,\n')
    with pytest.raises(DataError) as e:
        readers.read(p, "csv")
    expect(e, "--schema")
    s = Schema(fields=(Field("a"), Field("x", "numeric")), label="y")
    r = readers.read(p, "csv", s)
    assert r.table.column("a").to_pylist() == ["hello, world", "b"] and r.table.column("x").to_pylist() == [1.5, None]


def test_parquet_with_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepfm.schema import Field, Schema

    pq.write_table(pa.table({"y": [1, 0, 1], "a": [3, 4, None], "x": [0.5, None, 2.0]}), tmp_path / "d.parquet")
    s = Schema(fields=(Field("a"), Field("x", "numeric")), label="y")
    r = readers.read(tmp_path / "d.parquet", "parquet", s)
    assert r.table.column("a").to_pylist() == ["3", "4", None] and r.label.tolist() == [1, 0, 1]


def test_libfm_labels_and_fields(tmp_path):
    p = write(tmp_path / "f.libfm", "1 3:1 10:1\r\n-1 4:1 11:1\r\n1 3:1 12:1\r\n")
    r = readers.read(p, "libfm")
    assert r.label.tolist() == [1, 0, 1] and r.table.column("f0").to_pylist() == ["3", "4", "3"]
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "g.libfm", "1 3:1 10:1\n2 4:1 11:1\n"), "libfm")
    expect(e, "line 2", "label")
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "h.libfm", "1 3:1 10:1\n0 4:1\n"), "libfm")
    expect(e, "line 2", "columns")
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "k.libfm", "1 3:1 10:0.5\n"), "libfm")
    expect(e, "line 1", "one-hot")


def test_avazu_header_optional_and_derived_time_fields(tmp_path):
    head = ",".join(readers.AVAZU_NAMES)
    row = "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22," \
          "a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79"
    a = readers.read(write(tmp_path / "a.csv", head + "\n" + row + "\n"), "avazu")
    b = readers.read(write(tmp_path / "b.csv", row + "\n"), "avazu")
    assert a.table.equals(b.table)
    assert a.table.column("hour_of_day").to_pylist() == ["00"]
    assert a.table.column("weekday").to_pylist() == ["1"]  # 2014-10-21 was a Tuesday (Mon=0)
    assert "id" not in a.table.column_names
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "c.csv", row.replace("14102100", "1410") + "\n"), "avazu")
    expect(e, "line 1", "'hour'")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError):
        readers.read(tmp_path / "nope.tsv", "criteo")
    with pytest.raises(DataError) as e:
        readers.read(write(tmp_path / "x.tsv", crow()), "xml")
    expect(e, "unknown format")


def test_schema_file_errors_are_schema_errors(tmp_path):
    from deepfm import schema as S

    with pytest.raises(SchemaError):
        S.load(write(tmp_path / "s.yaml", "fields:\n  - {name: a, kind: numeric, hash_buckets: 3}\n"))


# ---------------------------------------------------------------- the real samples in ../shared/data


@pytest.mark.realdata
@pytest.mark.parametrize("fmt,rel,rows,positives", [
    ("criteo", "criteo_kaggle_head10k/train", 8000, 1728),
    ("criteo", "criteo_kaggle_head10k/test", 2000, 454),
    ("criteo", "criteo_kaggle_head10k/sample.test", 10000, None),
    ("avazu", "avazu_head10k/train", 8999, 1563),
    ("avazu", "avazu_head10k/test", 1000, 143),
    ("libfm", "frappe_nfm/frappe.validation.libfm", 57722, 19063),
    ("libfm", "ipinyou_2997_fnn_sample/train.fm.txt", 26773, 255),
    ("libfm", "ipinyou_2997_fnn_sample/test.fm.txt", 21150, 50),
    ("movielens", "movielens_100k/ml-100k.inter", 100000 - 27145, 55375),
    ("criteo", "tiny_samples_deepctr/criteo_sample.txt", 200, 49),
    ("avazu", "tiny_samples_deepctr/avazu_sample.txt", 100, 20),
])
def test_real_samples_load(fmt, rel, rows, positives):
    r = readers.read(shared(rel), fmt)
    assert r.rows == rows and r.skipped.count == 0
    if positives is None:
        assert r.label is None
    else:
        assert int(np.sum(r.label)) == positives


@pytest.mark.realdata
def test_movielens_join_and_genres():
    r = readers.read(shared("movielens_100k/ml-100k.inter"), "movielens")
    first = {c: r.table.column(c)[0].as_py() for c in r.table.column_names}
    # first kept row: user 186 rated item 302 with 3? no: row 1 (196, 242, 3) is dropped; row 2 is (186, 302, 3)
    assert first["user_id"] and first["gender"] in ("M", "F") and isinstance(first["class"], str)
    assert r.table.column("age").null_count == 0 and r.table.column("class").null_count == 0


def test_empty_strings_mask_uses_offsets_and_validity_and_respects_slices():
    import pyarrow as pa

    from deepfm.data.readers import _empty_strings

    arr = pa.array(["a", "", None, "bc", "", None, "d"], type=pa.string())
    assert _empty_strings(arr).tolist() == [False, True, False, False, True, False, False]
    assert _empty_strings(arr.slice(2, 3)).tolist() == [False, False, True]
    assert _empty_strings(arr.slice(5, 2)) is None  # a null and "d": nothing empty
    assert _empty_strings(pa.array(["x", None], type=pa.binary())) is None
    assert _empty_strings(pa.array(["", "y"], type=pa.large_string())).tolist() == [True, False]
