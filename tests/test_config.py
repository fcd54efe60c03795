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


def test_removed_options_are_refused_but_old_configs_with_their_defaults_still_load(tmp_path):
    """``cluster.final``, ``model.cell_token`` and ``model.residual_init`` are gone: asking for
    what they did (a Ward or head final step) is an error naming the key, while a config saved
    before (YAML, or a fitted model's params) holding their old defaults loads as today's."""
    import dataclasses

    flat = CICLConfig().flat()
    assert not {"cluster.final", "model.cell_token", "model.residual_init"} & set(flat)
    for key, value in (
        ("cluster.final", "ward"),
        ("cluster.final", "head"),
        ("model.cell_token", True),
        ("model.residual_init", 0.5),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            CICLConfig().with_overrides({key: value})
    old = CICLConfig().with_overrides({"seed": 5}).to_dict()
    old["cluster"]["final"] = "kmeans"
    old["model"] |= {"cell_token": False, "residual_init": 0.1}
    assert CICLConfig.from_dict(old) == CICLConfig(seed=5)
    p = tmp_path / "old.yaml"
    p.write_text("preset: reference\ncluster:\n  final: kmeans\nmodel:\n  cell_token: false\n")
    assert load_config(p) == preset("reference")
    p.write_text("cluster:\n  final: ward\n")
    with pytest.raises(ConfigError, match=r"cluster\.final"):
        load_config(p)
    # a fitted model's params after an h5ad round trip: numpy scalars
    import numpy as np

    stored = dataclasses.asdict(CICLConfig())
    stored["model"] |= {"cell_token": np.bool_(False), "residual_init": np.float64(0.1)}
    stored["cluster"]["final"] = np.str_("kmeans")
    assert CICLConfig.from_dict(stored) == CICLConfig()
