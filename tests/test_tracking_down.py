"""Tracking stores that cannot be used (issue 42): a server that does not answer, a SQLite file
that is not an MLflow store. Each fails within seconds, before any work, with one error line;
a store that is new or real still works."""

import os
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cicl.cli import main
from cicl.data.synthetic import synthetic_adata
from cicl.errors import CICLError
from cicl.tracking import HTTP_DEFAULTS, check_server, mlflow_client, resolve_mlflow_uri

LIMIT_S = 15.0  # MLflow's own retries took minutes


@pytest.fixture
def closed_port():
    """A port nothing listens on: bound by us, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_within(argv: list[str], seconds: float = LIMIT_S) -> int:
    """``main(argv)``, failing the test if it has not returned within ``seconds``."""
    got: list[int] = []
    worker = threading.Thread(target=lambda: got.append(main(argv)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"cicl {argv[0]} still running after {seconds} s"
    assert got, "main raised"
    return got[0]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_runs_with_a_server_that_does_not_answer(closed_port, tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port}"
    assert main_within(["runs", "--mlflow-uri", uri, "--root", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"server at {uri} does not answer" in line and "mlflow server" in line


def test_fit_with_a_server_that_does_not_answer_starts_nothing(
    closed_port, tmp_path, tiny_cfg, capsys
):
    inp, out, cfg = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "cfg.yaml"
    synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1).write_h5ad(inp)
    tiny_cfg.to_yaml(cfg)
    uri = f"http://127.0.0.1:{closed_port}"
    argv = ["fit", str(inp), "--out", str(out), "-k", "3", "--config", str(cfg), "--quiet"]
    assert main_within([*argv, "--mlflow-uri", uri]) == 2
    assert "does not answer" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_runs_on_a_file_that_is_not_a_database(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    assert main_within(["runs", "--mlflow-uri", f"sqlite:///{notes}"]) == 2
    assert "not a SQLite database" in one_error_line(capsys.readouterr().err)
    assert notes.read_text() == "not a database\n"


def test_runs_on_a_database_that_is_not_an_mlflow_store_leaves_it_alone(tmp_path, capsys):
    db = tmp_path / "cells.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE cells (id INTEGER, label TEXT)")
    before = db.read_bytes()
    inp, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1).write_h5ad(inp)
    for argv in (["runs"], ["fit", str(inp), "--out", str(out), "-k", "3"]):
        assert main_within([*argv, "--mlflow-uri", f"sqlite:///{db}"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "not an MLflow store" in line and "cells" in line
    assert db.read_bytes() == before  # MLflow would have added its tables to it
    assert not out.exists()


def test_new_empty_and_real_stores_still_pass(tmp_path):
    new = tmp_path / "new.db"
    assert resolve_mlflow_uri(f"sqlite:///{new}", tmp_path) == f"sqlite:///{new}"
    assert not new.exists()  # created by its first use, not by the check
    empty = tmp_path / "empty.db"
    empty.touch()
    resolve_mlflow_uri(f"sqlite:///{empty}", tmp_path, must_exist=True)
    sqlite3.connect(tmp_path / "no_tables.db").close()
    resolve_mlflow_uri(f"sqlite:///{tmp_path / 'no_tables.db'}", tmp_path)
    real = f"sqlite:///{tmp_path / 'real.db'}"
    mlflow_client(real).create_experiment("e")
    assert resolve_mlflow_uri(real, tmp_path, must_exist=True) == real


def serve(status_of) -> HTTPServer:
    """A local HTTP server answering each GET with ``status_of(path)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status_of(self.path))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(
    "status_of",
    [
        lambda path: 200 if path == "/login/health" else 404,  # MLflow under a path prefix
        lambda path: 401,  # a login in front: up, MLflow's own message says the rest
        lambda path: 200 if "/api/2.0/mlflow/" in path else 404,  # a gateway: the API only
    ],
)
def test_a_server_that_answers_passes(tmp_path, status_of):
    server = serve(status_of)
    try:
        uri = f"http://127.0.0.1:{server.server_port}/login/"
        assert resolve_mlflow_uri(uri, tmp_path) == uri
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_server_that_is_not_mlflow_is_refused(tmp_path):
    server = serve(lambda path: 404)
    try:
        with pytest.raises(CICLError, match="answers but is not an MLflow tracking server"):
            resolve_mlflow_uri(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_never_answers_is_given_up_on():
    """A port that takes connections but never answers (a hung server): the timeout ends it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.perf_counter()
        with pytest.raises(CICLError, match="does not answer"):
            check_server(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.5)
        assert time.perf_counter() - t0 < 5


def test_client_gives_up_soon_but_keeps_the_users_settings(monkeypatch):
    for name in HTTP_DEFAULTS:  # recorded, so the test leaves the environment as it was
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    mlflow_client("http://127.0.0.1:1")  # no request is made
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
    assert int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) <= 1
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 3  # the name MLflow reads
