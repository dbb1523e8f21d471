"""CI's last guard (`timeout` in .ci/run sends SIGTERM) names the tests that were still running."""
import os
import pathlib
import signal
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent


def test_sigterm_names_the_tests_still_running(tmp_path):
    started = tmp_path / "started"
    (tmp_path / "test_stuck.py").write_text(
        "import pathlib, time\n\n"
        "def test_quick():\n    pass\n\n"
        "def test_stuck():\n"
        f"    pathlib.Path({str(started)!r}).write_text('x')\n"
        "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    # As .ci/run runs the suite: an xdist worker runs the tests, the controller only reports.
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "ci_guard", "-p", "no:cacheprovider",
                             "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_stuck.py")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the stuck test never started"
            time.sleep(0.2)
        time.sleep(3.0)  # the controller hears of the start from the worker a moment later (ms; 3 s under load)
        proc.send_signal(signal.SIGTERM)  # the controller only, as the guard's first signal reaches it
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker still sleeping in test_stuck
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out, err)
    assert "pytest stopped by SIGTERM; tests still running:" in err, err
    running = err.split("tests still running:")[1]
    assert "test_stuck.py::test_stuck (running" in running
    assert "test_quick" not in running
