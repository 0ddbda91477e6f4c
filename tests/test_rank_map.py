import json

import pytest

from hf_lorax.rank_map import key_matches, load_module_map, resolve_module_map

NAMES = [f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(12) for p in ("query", "value")]


@pytest.mark.parametrize(
    ("key", "name", "hit"),
    [
        ("layer.{0-5}.attention.self.query", "roberta.encoder.layer.5.attention.self.query", True),
        ("layer.{0-5}.attention.self.query", "roberta.encoder.layer.6.attention.self.query", False),
        ("layer.{0-5}.attention.self.query", "roberta.encoder.layer.15.attention.self.query", False),
        ("layer.{6-11}.*", "roberta.encoder.layer.11.attention.self.value", True),
        ("layer.{1,3}.*", "roberta.encoder.layer.3.attention.self.value", True),
        ("layer.{1,3}.*", "roberta.encoder.layer.2.attention.self.value", False),
        ("layer.{3}.*", "roberta.encoder.layer.3.attention.self.value", True),  # a one-element list
        ("layer.{3}.*", "roberta.encoder.layer.13.attention.self.value", False),
        ("query", "roberta.encoder.layer.0.attention.self.query", True),
        ("uery", "roberta.encoder.layer.0.attention.self.query", False),  # suffix on a "." boundary only
        ("self.query", "roberta.encoder.layer.0.attention.selfXquery", False),  # dots are literal
    ],
)
def test_key_syntax(key, name, hit):
    assert key_matches(key, name) is hit


def test_first_match_wins_and_exact_names():
    resolved = resolve_module_map({"layer.{0-5}.attention.self.query": 16, "layer.{6-11}.*": 4}, NAMES)
    assert resolved["roberta.encoder.layer.0.attention.self.query"] == 16
    assert "roberta.encoder.layer.0.attention.self.value" not in resolved
    assert resolved["roberta.encoder.layer.11.attention.self.value"] == 4
    assert len(resolved) == 6 + 12


def test_unmatched_key_names_closest_modules():
    with pytest.raises(ValueError, match=r"'layer.{0-5}.attention.self.qeury' matches no adapted module.*query"):
        resolve_module_map({"layer.{0-5}.attention.self.qeury": 16}, NAMES)


def test_map_from_json_file(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"rank_map": {"query": 8}, "threshold": 0.9}))
    assert load_module_map(str(tmp_path / "m.json"), what="rank_map") == {"query": 8}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_module_map(str(tmp_path / "bad.json"), what="rank_map")
