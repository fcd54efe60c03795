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


def test_every_value_of_every_shipped_space_makes_a_valid_trial_config():
    """A typo in a space's values (a metric or encoder name, a bound out of range) would only
    fail in the trial that draws it, minutes into a sweep; load_space probes one value per key."""
    from cicl.sweep import TUNE_DIR, load_space, trial_config

    spaces = sorted(TUNE_DIR.glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"default", "small", "large"}
    for path in spaces:
        space = load_space(path.stem)
        for key, dist in space.params.items():
            if dist["type"] == "k_around_estimate":
                continue
            values = dist["values"] if dist["type"] == "choice" else [dist["low"], dist["high"]]
            for v in values:
                cfg = trial_config(CICLConfig(), space, {key: v})
                if key != "augment.type":
                    section, name = key.split(".")
                    assert getattr(getattr(cfg, section), name) == v, (path.name, key, v)
    large = load_space("large")
    assert large.params["cluster.metric"]["values"] == ["full", "tied", "euclidean"]


def test_a_misspelt_choice_in_a_space_fails_its_trial_config():
    from cicl.sweep import Space, trial_config

    space = Space("t", {"cluster.metric": {"type": "choice", "values": ["full", "eucldean"]}}, {})
    with pytest.raises(ConfigError, match="metric"):
        trial_config(CICLConfig(), space, {"cluster.metric": "eucldean"})
