import pytest

from cicl.config import CICLConfig, ConfigError, load_config, preset


def test_roundtrip_yaml(tmp_path):
    cfg = CICLConfig().with_overrides({"loss.temperature": 0.3, "seed": 4})
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert load_config(path) == cfg


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'loss.temperature'"):
        CICLConfig().with_overrides({"loss.temprature": 0.3})


def test_invalid_values_and_types(tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        CICLConfig().with_overrides({"loss.temperature": 0})
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)


def test_reference_preset_reproduces_code_switches(tmp_path):
    ref = preset("reference")
    assert ref.model.encoder == "reference"
    assert ref.cluster.recluster_every is None
    assert ref.augment.resample == "static"
    assert ref.loss.cluster_loss == "code" and ref.loss.instance_loss == "code"
    # the code's final step is K-means with K: none of the later additions to it
    for name in ("reference", "contrastive"):
        c = preset(name).cluster
        assert c.cap_k == "off" and not c.ward_start, name
    p = tmp_path / "r.yaml"
    p.write_text("preset: reference\nseed: 3\n")
    cfg = load_config(p)
    assert cfg.model.encoder == "reference" and cfg.seed == 3


def test_flat_has_dotted_keys():
    flat = CICLConfig().flat()
    assert "loss.temperature" in flat and flat["seed"] == 0
