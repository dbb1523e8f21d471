"""The suite's last guard names what was running.

`.ci/run` stops the whole suite with SIGTERM when it overruns its limit (`timeout`); without this the
log ends in a row of dots and "EXIT 124", saying nothing of which tests were still going (a test stuck
alone is stopped earlier, and named, by pytest-timeout; this is for a suite slow as a whole, e.g. on a
loaded machine). The controller (the pytest process that is not an xdist worker) sees every test start and
finish, the workers' included, so on SIGTERM it prints them with how long each has run, then exits by
the same signal. Loaded by tests/conftest.py; a module of its own so that tests/test_ci_guard.py can
load it into a pytest of its own (`-p ci_guard`).
"""
import os
import signal
import sys
import time

_RUNNING_TESTS: dict[str, float] = {}  # nodeid -> time.monotonic() at its start


def pytest_runtest_logstart(nodeid, location):
    _RUNNING_TESTS[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid, location):
    _RUNNING_TESTS.pop(nodeid, None)


def _name_running_tests_and_exit(signum, frame):
    now = time.monotonic()
    running = sorted(_RUNNING_TESTS.items(), key=lambda item: item[1])
    lines = [f"  {nodeid} (running {now - start:.0f} s)" for nodeid, start in running] or ["  (none)"]
    sys.stderr.write(f"\npytest stopped by {signal.Signals(signum).name}; tests still running:\n"
                     + "\n".join(lines) + "\n")
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist (workers have it)
        signal.signal(signal.SIGTERM, _name_running_tests_and_exit)
