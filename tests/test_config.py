"""SSAConfig validation, LayerPlacement, and the YAML/JSON file format."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from ssa_tune.config import (
    DEFAULT_POSITION_INIT,
    SCHEMA_VERSION,
    LayerPlacement,
    SSAConfig,
    load_config,
    read_config_file,
    save_config,
)

# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("field, value", [
    ("query_position", "log"),
    ("query_position", None),
    ("query_gate", "mlp"),
    ("value_gate", "shared_heads"),
    ("key_gate", 1),
    ("token_scale", 0),
    ("token_scale", 1),
    ("token_scale", 1.5),
    ("token_scale", -0.1),
    ("token_scale", float("nan")),
    ("token_scale", "0.5"),
    ("per_head", 1),
    ("per_head", "yes"),
    ("per_head", None),
    ("sparsity_target", 0),
    ("sparsity_target", 1),
    ("sparsity_target", 1.2),
    ("sparsity_target", "low"),
    ("sparsity_weight", -0.1),
    ("sparsity_weight", float("inf")),
    ("sparsity_weight", True),
    ("temperature_lr_mult", 0),
    ("temperature_lr_mult", -2.0),
    ("temperature_lr_mult", None),
    ("position_init", "big"),
    ("position_init", float("nan")),
    ("sample_rows", 0),
    ("sample_rows", 2.5),
    ("sample_rows", True),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError) as err:
        SSAConfig(**{field: value})
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_negative_position_init_rejected_for_log_linear_only():
    with pytest.raises(ValueError, match=r"^position_init:.*log_linear"):
        SSAConfig(query_position="log_linear", position_init=-0.1)
    # a negative beta is a valid starting point for the other parameterisations
    assert SSAConfig(query_position="log_expexp", position_init=-0.1).beta_init == -0.1
    assert SSAConfig(query_position="log_sigmoid", position_init=-3.0).beta_init == -3.0


@pytest.mark.parametrize("layers, prefix", [
    ("some", "layers:"),
    (3, "layers:"),
    (None, "layers:"),
    ([1, "2"], "layers:"),
    ([1.0], "layers:"),
    ([True], "layers:"),
    ({"count": -1}, "layers.count:"),
    ({"count": 1.5}, "layers.count:"),
    ({"count": True}, "layers.count:"),
    ({"placement": "top"}, "layers.count:"),
    ({"count": 2, "placement": "left"}, "layers.placement:"),
    ({"count": 2, "where": "top"}, "layers.where:"),
])
def test_invalid_layers_are_named(layers, prefix):
    with pytest.raises(ValueError) as err:
        SSAConfig(layers=layers)
    assert str(err.value).startswith(prefix), str(err.value)


def test_layer_indices_out_of_range_are_named():
    cfg = SSAConfig(layers=[0, 5])
    with pytest.raises(ValueError, match=r"^layers: indices \[5\]"):
        cfg.resolve_layers(4)
    with pytest.raises(ValueError, match=r"^layers.count:"):
        SSAConfig(layers={"count": 5}).resolve_layers(4)


def test_defaults_and_derived_properties():
    cfg = SSAConfig()
    assert cfg.query_position == "log_expexp" and cfg.beta_init == 1.5
    assert not cfg.uses_sparsity
    assert SSAConfig(sparsity_target=0.5, sparsity_weight=0.1).uses_sparsity
    assert not SSAConfig(sparsity_target=0.5, sparsity_weight=0.0).uses_sparsity
    assert not SSAConfig(sparsity_target=None, sparsity_weight=0.1).uses_sparsity
    # every parameterisation's default starts from the authors' c = exp(-exp(1.5))
    c = math.exp(-math.exp(1.5))
    assert DEFAULT_POSITION_INIT["log_linear"] == pytest.approx(c)
    assert 1 / (1 + math.exp(-DEFAULT_POSITION_INIT["log_sigmoid"])) == pytest.approx(c)


def test_layers_normalised_and_hashable():
    assert SSAConfig(layers=[3, 1]).layers == (3, 1)
    assert SSAConfig(layers={"count": 2}).layers == LayerPlacement(2, "top")
    assert SSAConfig(layers=LayerPlacement(1, "middle")).layers == LayerPlacement(1, "middle")
    assert hash(SSAConfig(layers=[1, 2])) == hash(SSAConfig(layers=(1, 2)))
    with pytest.raises(Exception):
        SSAConfig().query_gate = "shared"  # frozen


def test_resolve_layers_forms():
    assert SSAConfig(layers="all").resolve_layers(4) == (0, 1, 2, 3)
    assert SSAConfig(layers=[3, -1, 0, 0]).resolve_layers(6) == (0, 3, 5)
    assert SSAConfig(layers=[]).resolve_layers(6) == ()
    assert SSAConfig(layers={"count": 2, "placement": "bottom"}).resolve_layers(6) == (0, 1)


@pytest.mark.parametrize("count, placement, n_layer, expected", [
    (2, "top", 6, (4, 5)),
    (2, "bottom", 6, (0, 1)),
    (2, "middle", 6, (2, 3)),
    (3, "middle", 6, (1, 2, 3)),
    (1, "middle", 5, (2,)),
    (2, "interleave", 6, (2, 5)),
    (3, "interleave", 12, (3, 7, 11)),
    (4, "interleave", 6, (1, 2, 4, 5)),
    (6, "interleave", 6, (0, 1, 2, 3, 4, 5)),
    (6, "top", 6, (0, 1, 2, 3, 4, 5)),
    (0, "top", 6, ()),
    (0, "interleave", 6, ()),
])
def test_layer_placement_resolve(count, placement, n_layer, expected):
    got = LayerPlacement(count, placement).resolve(n_layer)
    assert got == expected
    assert len(got) == count and len(set(got)) == count and all(0 <= i < n_layer for i in got)


@pytest.mark.parametrize("placement", ["top", "bottom", "middle", "interleave"])
def test_layer_placement_always_selects_count_distinct_layers(placement):
    for n_layer in range(1, 13):
        for count in range(n_layer + 1):
            got = LayerPlacement(count, placement).resolve(n_layer)
            assert len(set(got)) == count and all(0 <= i < n_layer for i in got), (n_layer, count)
    with pytest.raises(ValueError, match="^layers.count:"):
        LayerPlacement(7, placement).resolve(6)


# ------------------------------------------------------------------------------------------ files


FULL = SSAConfig(query_position="log_sigmoid", position_init=-2.5, query_gate="shared", value_gate="linear",
                 key_gate="shared", token_scale=0.25, per_head=False, layers=[0, 2, 5], sparsity_target=0.4,
                 sparsity_weight=1e-3, temperature_lr_mult=3.0, sample_rows=16)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("cfg", [
    SSAConfig(),
    FULL,
    SSAConfig(layers="all", query_gate="linear"),
    SSAConfig(layers=[3, 1]),
    SSAConfig(layers={"count": 3, "placement": "interleave"}),
    SSAConfig(layers=LayerPlacement(2, "middle"), sparsity_target=0.9, sparsity_weight=2),
], ids=["default", "full", "all", "list", "placement-dict", "placement"])
def test_round_trip(tmp_path, cfg, suffix):
    path = save_config(cfg, tmp_path / "sub" / f"ssa{suffix}")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.layers == cfg.layers and type(loaded.layers) is type(cfg.layers)
    text = path.read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data["schema_version"] == SCHEMA_VERSION and data["ssa"] == cfg.to_dict()


def test_round_trip_with_export_sections(tmp_path):
    path = save_config(FULL, tmp_path / "best.yaml", metrics={"val_loss": 1.25}, model={"n_layer": 6},
                       train=None)
    data = read_config_file(path)
    assert data["metrics"] == {"val_loss": 1.25} and "train" not in data
    assert load_config(path) == FULL
    with pytest.raises(ValueError, match="^optimizer: not a config file section"):
        save_config(FULL, tmp_path / "bad.yaml", optimizer={})


def test_replace_revalidates():
    cfg = SSAConfig().replace(query_gate="shared", layers={"count": 1})
    assert cfg.query_gate == "shared" and cfg.layers == LayerPlacement(1, "top")
    with pytest.raises(ValueError, match="^token_scale:"):
        cfg.replace(token_scale=2.0)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_rejects_unknown_ssa_key(tmp_path, suffix):
    path = _write(tmp_path, f"c{suffix}", {"schema_version": 1, "ssa": {"query_gate": "shared", "tau_max": 3}})
    with pytest.raises(ValueError, match=r"ssa\.tau_max: unknown SSA field") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_load_rejects_unknown_top_level_key(tmp_path):
    path = _write(tmp_path, "c.yaml", {"schema_version": 1, "ssa": {}, "extras": {}})
    with pytest.raises(ValueError, match="extras: unknown key"):
        load_config(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_rejects_newer_schema_version(tmp_path, suffix):
    path = _write(tmp_path, f"c{suffix}", {"schema_version": SCHEMA_VERSION + 1, "ssa": {}})
    with pytest.raises(ValueError, match=rf"schema_version: {SCHEMA_VERSION + 1} is newer"):
        load_config(path)


@pytest.mark.parametrize("data, message", [
    ({"ssa": {}}, "schema_version: required integer"),
    ({"schema_version": "1", "ssa": {}}, "schema_version: required integer"),
    ({"schema_version": 0, "ssa": {}}, "schema_version: must be >= 1"),
    ({"schema_version": 1}, "ssa: required"),
    ({"schema_version": 1, "ssa": [1]}, "ssa: must be a mapping"),
    ({"schema_version": 1, "ssa": {"token_scale": 1}}, r"ssa\.token_scale: must be in \(0, 1\)"),
    ({"schema_version": 1, "ssa": {"layers": {"count": 2, "placement": "up"}}}, r"ssa\.layers\.placement:"),
])
def test_load_errors_name_the_field(tmp_path, data, message):
    path = _write(tmp_path, "c.yaml", data)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_load_errors_for_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ssa: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad_json)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(scalar)


def test_hand_written_yaml_with_exponent_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; a hand-written config must still load it as a number."""
    path = tmp_path / "hand.yaml"
    path.write_text("schema_version: 1\nssa:\n  sparsity_target: 0.3\n  sparsity_weight: 1e-3\n"
                    "  temperature_lr_mult: 5E+1\n  layers: [0, 1]\n  query_gate: none\n")
    cfg = load_config(path)
    assert cfg.sparsity_weight == pytest.approx(1e-3) and cfg.temperature_lr_mult == 50.0
    assert cfg.query_gate == "none" and cfg.layers == (0, 1)
