"""The supervisor of ``serve --ray``: a child that ends without stopping on its own (as Ray ends a driver
whose raylet died) is reported in one line with its status and its last problem, what it left running is
stopped, and the exit status is the child's; a child that stopped on its own is passed through silently."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import time

import pytest

from retriever_server.environment import SUPERVISED
from retriever_server.supervisor import supervise

psutil = pytest.importorskip("psutil")

# The child reports through the pipe as the server does, leaves a grandchild running, and dies as Ray
# makes a driver die (_exit, no Python unwinding) or stops on its own.
CHILD = textwrap.dedent(f"""
    import os, subprocess, sys
    pipe = os.fdopen(int(os.environ["{SUPERVISED}"]), "w", buffering=1)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(orphan.pid, flush=True)
    pipe.write("problem lost the connection to Ray: its GCS does not answer\\n")
    if sys.argv[1] == "done":
        pipe.write("done 0\\n")
        orphan.kill(); orphan.wait()
        os._exit(0)
    os._exit(1)
""")


def test_a_child_that_dies_is_reported_and_what_it_left_is_stopped(caplog, capfd):
    caplog.set_level(logging.INFO, logger="ragr1-retriever")
    started = time.monotonic()
    code = supervise([], command=[sys.executable, "-c", CHILD, "dies"])
    assert code == 1 and time.monotonic() - started < 30
    [line] = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert line.startswith("stopped: the serving process (pid ") and "exited with status 1" in line, line
    assert "after: lost the connection to Ray: its GCS does not answer" in line, line
    orphan = int(capfd.readouterr().out.split()[0])
    if sys.platform.startswith("linux"):  # the supervisor is the orphan's subreaper there
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE


def test_a_child_that_stopped_on_its_own_is_passed_through(caplog):
    caplog.set_level(logging.INFO, logger="ragr1-retriever")
    assert supervise([], command=[sys.executable, "-c", CHILD, "done"]) == 0
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert SUPERVISED not in os.environ
