"""The installed command-line tools, run as users run them (subprocesses)."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import requests

import retriever_server

PACKAGE_DIR = Path(retriever_server.__file__).parent


def _run(*args, env=None, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(found).exists(), f"{name} is not installed: pip install '.[retriever]'"
    return found


@pytest.mark.parametrize("command", [["ragr1-retriever", "--help"], ["ragr1-retriever", "serve", "--help"],
                                     ["ragr1-retriever", "demo", "--help"], ["ragr1-retriever", "query", "--help"],
                                     ["ragr1-retriever", "plan", "--help"],
                                     ["ragr1-index", "--help"], ["ragr1-index", "build", "--help"]])
def test_help(command):
    result = _run(_tool(command[0]), *command[1:])
    assert result.returncode == 0 and "usage:" in result.stdout


def test_serve_help_documents_the_defaults():
    help_text = " ".join(_run(_tool("ragr1-retriever"), "serve", "--help").stdout.split())
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8000"), ("--topk", "3")]:
        assert re.search(rf"{flag} \S+ (?:(?! --).)*\(default: {re.escape(default)}\)", help_text), flag


def test_index_build_names_the_bad_row_and_writes_nothing(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "contents": "fine"}\n{"id": "2", "text": 7}\n')
    out = tmp_path / "index"
    result = _run(_tool("ragr1-index"), "build", "--corpus", str(corpus), "--out", str(out))
    assert result.returncode == 2
    assert f"{corpus}, line 2, field 'contents'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists() and not (out / "corpus.arrow").exists()


def test_index_build_then_serve_then_query_then_stop(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"Item {i}"\nThe item number {i} is '
                                          f'{colour}.'}) + "\n" for i, colour in
                              enumerate(["red", "green", "blue", "yellow", "purple"])))
    out = tmp_path / "index"
    built = _run(_tool("ragr1-index"), "build", "--corpus", str(corpus), "--out", str(out), "--kind", "bm25")
    assert built.returncode == 0, built.stderr
    server = subprocess.Popen([_tool("ragr1-retriever"), "serve", "--index", str(out), "--port", "0",
                               "--auth-token", "tok"], stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_for_url(server)
        _wait_ready(url)
        # Readiness is logged once the index is loaded, after the address (issue 16: not before).
        assert any(f"ready: serving on {url}" in server.stderr.readline() for _ in range(50))
        query = _run(_tool("ragr1-retriever"), "query", "--url", url, "--auth-token", "tok", "--topk", "1",
                     "which item is purple")
        assert query.returncode == 0, query.stderr
        assert json.loads(query.stdout)["result"][0][0]["document"]["id"] == "4"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def _wait_for_url(process: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return match.group(1)
        assert process.poll() is None, f"server exited early: {line}"
    raise AssertionError("the server never logged its address")


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if requests.get(f"{url}/health", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


def test_serve_exits_with_the_reason_when_the_index_is_missing(tmp_path):
    result = _run(_tool("ragr1-retriever"), "serve", "--index", str(tmp_path / "nothing"), "--port", "0",
                  timeout=120)
    assert result.returncode == 1
    assert "has no manifest.json" in result.stderr


@pytest.mark.slow
def test_demo_command(cache_dir, demo_index):
    env = {**os.environ, "RAGR1_CACHE_DIR": str(cache_dir)}
    result = _run(_tool("ragr1-retriever"), "demo", env=env)
    assert result.returncode == 0, result.stderr
    assert "one request, 3 queries" in result.stdout
    single = re.search(r"single-hop: (\d+)/(\d+)", result.stdout)
    assert single and int(single.group(1)) >= 0.95 * int(single.group(2))


def test_retriever_server_never_imports_verl():
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("verl", "ragr1_verl") for n in names), f"{path} imports {names}"
    code = ("import sys, retriever_server.cli, retriever_server.index_cli, retriever_server.demo; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('verl', 'ragr1_verl')]; "
            "assert not bad, bad")
    assert _run(sys.executable, "-c", code).returncode == 0


def test_installed_distribution_ships_the_demo_data_and_entry_points():
    distribution = metadata.distribution("ragr1-verl")
    files = {str(f) for f in distribution.files or []}
    assert {"retriever_server/demo/corpus.jsonl", "retriever_server/demo/questions.jsonl"} <= files
    scripts = {ep.name for ep in distribution.entry_points if ep.group == "console_scripts"}
    assert {"ragr1-retriever", "ragr1-index"} <= scripts


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_then_exits_cleanly(cache_dir, demo_index):
    import concurrent.futures

    env = {**os.environ, "RAGR1_CACHE_DIR": str(cache_dir)}
    # The batcher waits up to 3 s for a batch to fill: every request is in flight when the signal comes.
    server = subprocess.Popen([_tool("ragr1-retriever"), "serve", "--demo", "--port", "0", "--cache-size", "0",
                               "--max-wait-ms", "3000"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _wait_for_url(server)
        _wait_ready(url, timeout=120)
        bodies = [{"queries": [f"question {n} about bridge {i}" for i in range(32)], "topk": 3} for n in range(4)]
        sessions = [requests.Session() for _ in bodies]
        for session in sessions:  # connections the server has accepted before the signal
            assert session.get(f"{url}/health", timeout=30).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(session.post, f"{url}/retrieve", json=body, timeout=120)
                       for session, body in zip(sessions, bodies)]
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            responses = [answer.result() for answer in answers]
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stderr.read()
    assert "Traceback" not in log and "Bad file descriptor" not in log, log[-3000:]
    for response in responses:  # every request that reached the server gets its whole answer
        assert response.status_code == 200 and len(response.json()["result"]) == 32
    assert "stopping: answering the requests in flight" in log
