"""What a sweep shows on the console: one progress bar over trials instead of Ray Tune's
status tables, Tune kept quiet, and the sweep's stdout sent to stderr less one raylet warning
(stdout holds only cicl's result)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any

import numpy as np


class DropNoise(io.TextIOBase):
    """The sweep's stdout, sent to ``sink`` (stderr) less one raylet warning: "N PYTHON worker
    processes have been started ... 4x the maximum expected startup concurrency". Ray prints it
    when tasks with fractional CPU requests start many worker processes; cicl requests
    fractional CPUs on purpose (trial drivers share cores with their workers), so on a small
    machine every sweep repeated it to the user, with nothing for them to do about it."""

    NOISE = ("maximum expected startup concurrency",)

    def __init__(self, sink) -> None:
        self.sink = sink
        self._dropped = False  # print() writes the line's "\n" separately: drop it too

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # what is asked of stdout is answered as the sink would
        return self.sink.isatty()

    def fileno(self) -> int:
        return self.sink.fileno()

    def write(self, s: str) -> int:
        if any(n in s for n in self.NOISE):
            self._dropped = not s.endswith("\n")
            return len(s)
        if self._dropped and s == "\n":
            self._dropped = False
            return len(s)
        self._dropped = False
        return self.sink.write(s)

    def flush(self) -> None:
        self.sink.flush()


@contextlib.contextmanager
def quiet_tune(quiet: bool):
    """Without Tune's tables, Tune stays silent: its experiment box, "View detailed results
    here" and TensorBoard hint (printed by its new output engine at every verbosity; the
    legacy reporter it falls back to honours ``verbose=0``) and its closing INFO lines ("Wrote
    the latest version of all result files ...", "Total run time ..."). The trial bar and
    cicl's summary say what matters; ``--tune-tables`` brings Tune's own output back."""
    import logging

    log = logging.getLogger("ray.tune.tune")
    level, engine = log.level, os.environ.get("RAY_AIR_NEW_OUTPUT")
    if quiet:
        log.setLevel(logging.WARNING)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tune when fit() starts
    try:
        yield
    finally:
        log.setLevel(level)
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        if engine is not None:
            os.environ["RAY_AIR_NEW_OUTPUT"] = engine


@contextlib.contextmanager
def quiet_lost_trials(lost):
    """While a sweep runs: no traceback from Tune for a trial that failed because the tracking
    server stopped answering (``TrackingLost``), and none of Tune's closing lines once the
    sweep was stopped for it (``lost`` set: "Trials did not complete", "Resume experiment
    with: Tuner.restore(...)"); the driver's one error line says what happened and what to do.
    Other trial errors are shown as before."""
    import logging

    class DropLost(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            # Tune's RayTaskError carries the trial's traceback text, TrackingLost's name in it
            text = f"{type(exc).__name__}: {exc}" if exc is not None else ""
            return not (lost.is_set() or "TrackingLost" in text)

    drop = DropLost()
    logs = [logging.getLogger(n) for n in ("ray.tune.tune", "ray.tune.execution.tune_controller")]
    for log in logs:
        log.addFilter(drop)
    try:
        yield
    finally:
        for log in logs:
            log.removeFilter(drop)


def trial_bar(total: int):
    """A Tune callback drawing one progress bar over trials on the driver: finished trials
    (ASHA-stopped and errored ones count as done) and the best final objective. Replaces Tune's
    periodic status tables, which repeat every trial's parameters many times per sweep."""
    from ray import tune

    class TrialBar(tune.Callback):
        def __init__(self) -> None:
            self.bar = None
            self.best: float | None = None

        def setup(self, **info: Any) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr)

        def _done(self) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            obj = (trial.last_result or {}).get("objective")  # the trial's final report
            if self.bar is not None and obj is not None and np.isfinite(obj):
                self.best = obj if self.best is None else max(self.best, obj)
                self.bar.set_postfix(best_objective=f"{self.best:.4f}")
            self._done()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._done()

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialBar()
