import pytest

from deepfm import schema as S
from deepfm.data.infer import infer_schema
from deepfm.errors import SchemaError


def _load(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return S.load(p)


def test_yaml_and_json_schema_load(tmp_path):
    s = _load(tmp_path, "label: click\ndefaults: {min_count: 3}\nfields:\n  - {name: a}\n"
              "  - {name: x, kind: numeric, transform: log}\n  - {name: g, kind: multi, sep: '|', max_len: 4}\n")
    assert s.label == "click" and s.field("a").min_count == 3 and s.field("x").transform == "log"
    j = _load(tmp_path, '{"label": "y", "fields": ["a", {"name": "b", "hash_buckets": 100}]}', "s.json")
    assert j.field("b").hash_buckets == 100
    s.save(tmp_path / "out.yaml")
    assert S.load(tmp_path / "out.yaml") == s


@pytest.mark.parametrize("text,needle", [
    ("fields:\n  - {name: a, kind: categoric}\n", "unknown kind 'categoric'"),
    ("fields:\n  - {name: a}\n  - {name: a}\n", "duplicated field name 'a'"),
    ("fields:\n  - {name: a, min_count: 0}\n", "min_count must be an integer >= 1"),
    ("fields:\n  - {name: a, transform: log}\n", "only applies to numeric"),
    ("fields:\n  - {name: a, colour: red}\n", "unknown option(s) ['colour']"),
    ("fields: []\n", "no fields"),
    ("label: a\nfields:\n  - {name: a}\n", "label column"),
    ("fields:\n  - {name: g, kind: multi, pooling: max}\n", "unknown pooling"),
    ("fields: {a: 1}\n", "'fields' must be a list"),
    ("fields:\n  - {name: a}\nextra: 1\n", "unknown top-level key"),
    ("fields: [a\n", "not valid YAML"),
])
def test_schema_errors_are_clear(tmp_path, text, needle):
    with pytest.raises(SchemaError) as e:
        _load(tmp_path, text)
    assert needle in str(e.value) and "s.yaml" in str(e.value)


def test_infer_schema_from_csv(tmp_path):
    rows = ["click,id,site,price,tags"] + [f"{i % 2},{i},s{i % 7},{i * 13.5},a|b{i % 3}" for i in range(200)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    s = infer_schema(tmp_path / "d.csv")
    assert s.label == "click" and s.names == ["site", "price", "tags"]
    assert [f.kind for f in s.fields] == ["categorical", "numeric", "multi"]
