"""What reaches the console: Ray's relayed raylet notices go to the log file whenever they come."""

from __future__ import annotations

import io
import os
import sys
import threading

from pipelines import console


def test_raylet_notices_go_to_the_log_file_and_the_runs_lines_to_the_console(tmp_path, monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    monkeypatch.setattr(console, "log_file", None)
    monkeypatch.setattr(console, "verbose", False)
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    console.setup(False, tmp_path / "logs" / "run.log")
    relay = threading.Thread(target=lambda: print("(raylet) WARNING: 8 PYTHON worker processes have been started"),
                             name=console._RayletNoticesToLog.RAY_NOTICE_THREAD)
    relay.start()
    relay.join()
    print("epoch   1/2  loss 4.1")
    assert shown.getvalue() == "epoch   1/2  loss 4.1\n"
    assert "8 PYTHON worker processes" in (tmp_path / "logs" / "run.log").read_text()
    assert sys.stdout.encoding == shown.encoding and not sys.stdout.isatty()
    assert os.environ["RAY_DEDUP_LOGS"] == "0"  # no repeats held back for the main thread at exit
