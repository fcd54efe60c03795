"""Search spaces a sweep cannot run (issue 42): each is refused by ``load_space``, before the
data is read or Ray starts, with one ``error:`` line naming the file, the key and what to do;
nothing is written. (A tracking server that goes away mid-sweep: tests/test_tune.py, with the
other sweeps that start Ray.)"""

from __future__ import annotations

import pytest

from cicl.cli import main
from cicl.errors import CICLError
from cicl.sweep import load_space

PARAM = "params:\n  {key}: {dist}\n"
LAM = "params:\n  loss.lam: {type: uniform, low: 0.1, high: 1.0}\n"

# (what the file holds, what the one error line must say)
BAD_SPACES = {
    "unknown type": (
        PARAM.format(key="train.lr", dist="{type: lognormal, low: 1.0e-4, high: 1.0e-2}"),
        ["params.train.lr has unknown type 'lognormal'", "Did you mean 'loguniform'?"],
    ),
    "no type": (
        PARAM.format(key="train.lr", dist="{low: 1.0e-4, high: 1.0e-2}"),
        ["params.train.lr has no 'type'", "Use one of: loguniform"],
    ),
    "low above high": (
        PARAM.format(key="train.lr", dist="{type: uniform, low: 0.1, high: 0.01}"),
        ["params.train.lr: low (0.1) is above high (0.01); swap them"],
    ),
    "bound not a number": (
        PARAM.format(key="train.lr", dist="{type: uniform, low: small, high: 0.01}"),
        ["params.train.lr: 'low' must be a finite number, got 'small'"],
    ),
    "missing bound": (
        PARAM.format(key="train.lr", dist="{type: loguniform, low: 1.0e-4}"),
        ["params.train.lr: type loguniform needs 'low' and 'high' (missing 'high')"],
    ),
    "log scale from 0": (
        PARAM.format(key="loss.lam", dist="{type: loguniform, low: 0, high: 1}"),
        ["params.loss.lam: type loguniform needs low > 0", "use type uniform"],
    ),
    "empty choice": (
        PARAM.format(key="loss.lam", dist="{type: choice, values: []}"),
        ["params.loss.lam: type choice needs a non-empty list"],
    ),
    "fractional int bounds": (
        PARAM.format(key="train.epochs", dist="{type: int, low: 2.5, high: 6}"),
        ["params.train.epochs: type int needs whole-number bounds"],
    ),
    "float range of a whole number": (
        PARAM.format(key="train.batch_size", dist="{type: uniform, low: 64, high: 256}"),
        ["train.batch_size is a whole number: use type int or choice"],
    ),
    "misspelt field": (
        PARAM.format(key="loss.lam", dist="{type: uniform, lo: 0.1, high: 1}"),
        ["params.loss.lam: type uniform takes low, high, not 'lo'", "Did you mean 'low'?"],
    ),
    "misspelt key": (
        PARAM.format(key="loss.temprature", dist="{type: uniform, low: 0.1, high: 1}"),
        ["params: unknown config key 'loss.temprature'", "Did you mean 'loss.temperature'?"],
    ),
    "a value the config refuses": (
        PARAM.format(key="loss.temperature", dist="{type: uniform, low: 0.0, high: 1}"),
        ["params.loss.temperature: a trial drawing 0.0 would fail", "must be > 0"],
    ),
    "a misspelt choice": (
        PARAM.format(key="cluster.metric", dist="{type: choice, values: [full, eucldean]}"),
        ["params.cluster.metric: a trial drawing 'eucldean' would fail"],
    ),
    "unknown augmentation": (
        PARAM.format(key="augment.type", dist="{type: choice, values: [all, blur]}"),
        ["params.augment.type: unknown augmentation type 'blur'"],
    ),
    "a single value under params": (
        PARAM.format(key="loss.lam", dist="0.5"),
        ["params.loss.lam must be a distribution", "belongs under fixed:"],
    ),
    "params not a mapping": ("params:\n  - loss.lam\n", ["'params:' must map dotted config"]),
    "fixed not a mapping": (LAM + "fixed: [1, 2]\n", ["'fixed:' must map dotted config keys"]),
    "fixed value refused": (LAM + "fixed:\n  train.lr: -1\n", ["fixed: train.lr must be > 0"]),
    "fixed unknown key": (
        LAM + "fixed:\n  train.lrr: 0.1\n",
        ["fixed: unknown config key 'train.lrr'", "Did you mean 'train.lr'?"],
    ),
    "searched and fixed": (
        LAM + "fixed:\n  loss.lam: 0.5\n",
        ["'loss.lam' is both searched (params:) and fixed (fixed:)"],
    ),
    "unknown section": (
        LAM + "fixd:\n  train.epochs: 3\n",
        ["unknown section 'fixd'", "Did you mean 'fixed'?"],
    ),
    "no params": ("fixed:\n  train.epochs: 3\n", ["has no 'params'"]),
    "not YAML": (LAM + "fixed: {train.epochs: 3\n", ["is not valid YAML at line"]),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_a_bad_space_is_one_error_line_before_any_work(case, data_dir, tmp_path, capsys):
    text, expected = BAD_SPACES[case]
    space = tmp_path / "space.yaml"
    space.write_text(text)
    root, out = tmp_path / "root", tmp_path / "out.h5ad"
    argv = ["tune", str(data_dir / "biase.h5ad"), "--space", str(space), "--root", str(root)]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: Search space {space}"), err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not root.exists() and not out.exists()  # no store, no Ray session, no output


def test_a_space_comes_back_normalised(tmp_path):
    """Bounds YAML reads as strings (``1e-4``) or ints are numbers of the right kind, so the
    base point and Tune's distributions never compare a string with a number."""
    space = tmp_path / "s.yaml"
    space.write_text(
        "params:\n"
        "  train.lr: {type: loguniform, low: 1e-4, high: 1e-2}\n"
        "  loss.lam: {type: uniform, low: 0, high: 1}\n"
        "  train.epochs: {type: int, low: 2.0, high: 6}\n"
        "  cluster.n_clusters: {type: k_around_estimate}\n"
        "fixed:\n  train.batch_size: 64\n"
    )
    s = load_space(space)
    assert s.params == {
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "loss.lam": {"type": "uniform", "low": 0.0, "high": 1.0},
        "train.epochs": {"type": "int", "low": 2, "high": 6},
        "cluster.n_clusters": {"type": "k_around_estimate", "delta": 4},
    }
    assert isinstance(s.params["train.epochs"]["low"], int)
    assert s.fixed == {"train.batch_size": 64}


def test_every_builtin_space_passes_the_checks():
    from cicl.sweep import builtin_spaces

    for name in builtin_spaces():
        assert load_space(name).params, name
    with pytest.raises(CICLError, match="not found"):
        load_space("no_such_space")
