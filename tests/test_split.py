from deepfm.data.split import split_lines


def test_split_lines_partitions_with_header_and_seed(tmp_path):
    src = tmp_path / "d.inter"
    src.write_text("h:token\n" + "".join(f"{i}\n" for i in range(100)))
    (tmp_path / "d.user").write_text("u\n")
    a = split_lines(src, tmp_path / "a", {"train": 0.7, "test": 0.3}, seed=1, header=True)
    b = split_lines(src, tmp_path / "b", {"train": 0.7, "test": 0.3}, seed=1, header=True)
    tr, te = (a[k].read_text().splitlines() for k in ("train", "test"))
    assert tr[0] == te[0] == "h:token" and len(tr) == 71 and len(te) == 31
    assert sorted(map(int, tr[1:] + te[1:])) == list(range(100))
    assert tr[1:] == sorted(tr[1:], key=int)  # original order kept within a part
    assert a["train"].read_text() == b["train"].read_text()
    assert (tmp_path / "a" / "train.user").exists()


def test_time_split_ties_go_to_the_later_split_and_text_orders_as_text():
    import numpy as np
    import pyarrow as pa
    import pytest

    from deepfm.data.split import time_key, time_split
    from deepfm.errors import DataError

    key, cut = time_key(pa.array(["5", "1", "3", "3", "3", "2", "4", "4", "1", "5"]))  # numbers as text
    tr, va, te = time_split(key, valid_fraction=0.3, test_fraction=0.2)
    assert tr.tolist() == [1, 5, 8] and va.tolist() == [2, 3, 4, 6, 7] and te.tolist() == [0, 9]  # 3s together
    tr, va, te = time_split(key, valid_from=cut("3"), test_from=cut("4.5"))
    assert (tr.size, va.size, te.size) == (3, 5, 2)
    day, cut = time_key(pa.array(["2024-05-02", "2024-04-30", "2024-05-01"]))
    tr, va, te = time_split(day, valid_from=cut("2024-05-01"))
    assert tr.tolist() == [1] and va.tolist() == [0, 2] and te.size == 0
    assert time_split(day, valid_from=cut("2024-05-01T12"))[1].tolist() == [0]  # a cut between two values
    with pytest.raises(DataError, match="empty values"):
        time_key(pa.array([1.0, None]))
    with pytest.raises(DataError, match="after the test cut"):
        time_split(np.arange(10.0), valid_from=5.0, test_from=3.0)
