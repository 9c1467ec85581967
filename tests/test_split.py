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
