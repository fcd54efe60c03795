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


# --- a tracking server that goes away (the parts a real sweep needs no Ray to show) ---


@pytest.fixture
def dead_uri():
    """A tracking URI nothing answers at (a port bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def live_uri():
    """A tracking URI whose /health answers 200 (a server that is up)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_trial_failing_while_the_server_is_gone_reports_tracking_lost(dead_uri, live_uri):
    """Whatever a trial's failing MLflow call raised, the trial fails with ``TrackingLost``
    when the server does not answer; with the server up, or a store on disk, the error is
    left as it was (a bug stays a bug)."""
    from cicl.sweep import TrackingLost, tracking_guard

    with pytest.raises(TrackingLost, match=f"server at {dead_uri} stopped answering") as got:
        with tracking_guard(dead_uri):
            raise ConnectionError("Max retries exceeded")
    assert isinstance(got.value.__cause__, ConnectionError)
    for uri in (live_uri, "sqlite:////tmp/none/mlflow.db"):
        with pytest.raises(ZeroDivisionError), tracking_guard(uri):
            raise ZeroDivisionError
    with tracking_guard(dead_uri):  # no failure: nothing asked of the server
        pass


def test_the_driver_knows_a_trial_failed_on_the_tracking_server(tmp_path):
    """Read from Tune's error file of the trial: its latest failure only (an earlier one, from
    before a resume, does not count)."""
    from types import SimpleNamespace

    from cicl.sweep.tuner import _failed_on_tracking

    err = tmp_path / "error.txt"
    trial = SimpleNamespace(error_file=str(err))
    assert not _failed_on_tracking(trial)  # no error file yet
    assert not _failed_on_tracking(SimpleNamespace(error_file=None))
    err.write_text("Failure # 1 (occurred at x)\nray::ImplicitFunc.train()\nZeroDivisionError\n")
    assert not _failed_on_tracking(trial)
    lost = "Failure # 2 (occurred at y)\ncicl.sweep.trial.TrackingLost: the MLflow ...\n"
    err.write_text(err.read_text() + lost)
    assert _failed_on_tracking(trial)
    err.write_text(err.read_text() + "Failure # 3 (occurred at z)\nValueError: bug\n")
    assert not _failed_on_tracking(trial)


def test_tune_is_stopped_through_its_own_handler_only():
    """Tune is stopped through the handler it installs for SIGUSR1 while it runs; with another
    handler or none (no sweep running, or one in another thread) nothing is called or
    signalled (SIGUSR1's default would kill the process)."""
    import signal

    from cicl.sweep.tuner import _stop_tune

    calls = []

    def tunes(sig, frame):
        calls.append(sig)

    tunes.__module__ = "ray.tune.tune"  # where Tune's handler comes from
    before = signal.getsignal(signal.SIGUSR1)  # an earlier sweep's in this process, maybe
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert _stop_tune() is False
        signal.signal(signal.SIGUSR1, lambda sig, frame: calls.append("other"))
        assert _stop_tune() is False and not calls
        signal.signal(signal.SIGUSR1, tunes)
        assert _stop_tune() is True and calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_tunes_own_report_of_a_lost_trial_is_not_shown(caplog):
    """Tune logs a failed trial with its traceback and, once stopped, that trials did not
    complete and how to call Tuner.restore: dropped for a tracking loss (the sweep's one
    error line says what to do), kept for any other error."""
    import logging
    import threading

    from cicl.sweep import TrackingLost
    from cicl.sweep.console import quiet_lost_trials

    log = logging.getLogger("ray.tune.execution.tune_controller")
    lost = threading.Event()
    with caplog.at_level(logging.INFO), quiet_lost_trials(lost):
        for exc in (TrackingLost("gone"), ValueError("a bug")):
            try:
                raise exc
            except Exception as e:  # noqa: BLE001
                log.error("Trial task failed for trial t", exc_info=e)
        lost.set()
        logging.getLogger("ray.tune.tune").error("Trials did not complete: [t]")
    kept = [r.exc_info[1] for r in caplog.records]
    assert len(kept) == 1 and isinstance(kept[0], ValueError)
    log.error("after the sweep")  # the filter is gone with the sweep
    assert caplog.records[-1].getMessage() == "after the sweep"


def test_a_server_gone_before_the_trials_start_nothing(dead_uri, tmp_path, monkeypatch):
    """The driver's own first MLflow call meets the dead server: one error that says nothing
    was run (there is nothing to resume), and Ray is never started."""
    import numpy as np

    import cicl.sweep.tuner as tuner
    from cicl.config import CICLConfig
    from cicl.sweep import SweepOptions, TrackingLost, run_sweep

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once
    monkeypatch.setattr(tuner, "ensure_ray", lambda *a: pytest.fail("Ray started"))
    x = np.zeros((20, 4), np.float32)
    opts = SweepOptions(trials=2, space="small", mlflow_uri=dead_uri, root=str(tmp_path))
    with pytest.raises(TrackingLost, match="before the sweep started; nothing was run"):
        run_sweep(x, x, 3, CICLConfig(), opts)
