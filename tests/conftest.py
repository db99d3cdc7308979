"""Shared fixtures.

`run_cli` runs the `growrun` command in the test's own process (growrun.cli.main), for tests
of refusals that come before any training: a fresh `python -m growrun` costs ~2-3 s of
interpreter, torch and Hydra start-up, the in-process call a fraction of a second. The
process-level behaviour (the real exit status, no traceback on stderr) stays covered by a few
subprocess cases (tests/test_bad_inputs.py: test_refusals_in_a_real_process,
test_damaged_cifar_through_the_cli[runs_code]) and by the end-to-end tests that train in
subprocesses.

`one_thread` and `restore_torch_threads` put torch's thread settings back after a test; they are not
autouse: a module that wants them says `pytestmark = pytest.mark.usefixtures(...)`. Helpers shared by
several test modules live in the helpers_*.py modules beside this file (no test module imports
another).
"""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

# The helpers_*.py modules' asserts are rewritten like the test modules' (values in the failure message).
pytest.register_assert_rewrite("helpers_cli", "helpers_matrix", "helpers_neurons", "helpers_net2net",
                               "helpers_proc", "helpers_report", "helpers_sitenet", "helpers_solve",
                               "helpers_surgery", "helpers_training", "helpers_zygote")

# Warnings that a plain `python -m growrun` does not print (Python's default filters; DeprecationWarning
# only when raised by __main__, which growrun/__main__.py never does).
_SILENT_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _logging_state() -> dict:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                     if isinstance(lg, logging.Logger))]
    return {lg: (list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers}


def _restore_logging(saved: dict, disable: int) -> None:
    """Hydra's job logging (logging.config.dictConfig) replaces the root logger's handlers (pytest's
    among them) and adds a FileHandler on the run's log file: put every logger back as it was and
    close the handlers the call added."""
    logging.disable(disable)
    for lg, now in _logging_state().items():
        handlers, level, propagate, disabled = saved.get(lg, ([], logging.NOTSET, True, False))
        for h in now[0]:
            if h not in handlers:
                h.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def _torch_state() -> dict:
    import numpy as np
    import torch

    from growrun import devices

    return {"threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill": torch.utils.deterministic.fill_uninitialized_memory,
            "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
            "tf32": devices.tf32_flags(),
            "flush_denormal": (torch.tensor([1e-39]) * 0.5).item() == 0.0,  # set_flush_denormal has no getter
            "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state())}


def _restore_torch(s: dict) -> None:
    import numpy as np
    import torch

    from growrun import devices

    if torch.get_num_threads() != s["threads"]:
        torch.set_num_threads(s["threads"])
    torch.use_deterministic_algorithms(s["deterministic"], warn_only=s["warn_only"])
    torch.utils.deterministic.fill_uninitialized_memory = s["fill"]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = s["cudnn"]
    devices.set_tf32_flags(s["tf32"])
    torch.set_flush_denormal(s["flush_denormal"])
    random.setstate(s["rng"][0])
    np.random.set_state(s["rng"][1])
    torch.set_rng_state(s["rng"][2])


# Files every test of which trains through the real CLI in subprocesses (kills, signals, launchers,
# ranks, the GPU check's CPU part): all `slow`. Elsewhere a test is marked @pytest.mark.slow by hand
# when it trains a run end to end (about a second or more); `make test-fast` leaves them out.
SLOW_FILES = {"test_launchers.py", "test_cpu_safety.py", "test_faults.py", "test_faults_cli.py", "test_distributed.py",
              "test_gpu_check.py", "test_equal_compute.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist load` (xdist's default) with a work-stealing end, so the workers end together:
    tests/helpers_xdist.py."""
    if config.getvalue("dist") != "load":
        return None
    from helpers_xdist import LoadThenSteal

    return LoadThenSteal(config, log)


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker and the
    processes its tests start compute on one thread: two workers at two threads each would run
    ~3.5x slower than alone (OpenMP contention)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """The test matrices are small: one thread is as fast, and immune to the OpenMP contention
    of a loaded machine (which slows tiny multi-threaded ops down by 10x and more)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_torch_threads(monkeypatch):
    """The runs set torch's thread count and determinism for this process; put them back."""
    import torch

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failing run raises its own exception
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def run_cli(capfd):
    """`run_cli(*args, cwd=DIR, env={...})`: `growrun ARGS` run by growrun.cli.main in this process,
    as a subprocess.CompletedProcess (returncode, stdout, stderr), like `python -m growrun ARGS`
    started in DIR with GROWRUN_UID unset and `env` added. A SystemExit (Hydra's --help, a run's
    failure) becomes the return code; any other exception propagates (a subprocess would print
    its traceback). Warnings a plain interpreter prints are appended to stderr, so that a
    one-line check still sees them. Restored afterwards: the working directory, os.environ,
    sys.argv, Hydra's global state, logging, torch's threads / determinism / flush-denormal flags
    and the RNGs (set by a run that got as far as training). Output is captured with capfd (a
    test using run_cli cannot also use capsys); it stays in the test's captured output too,
    shown when the test fails."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import growrun.sweep
    from growrun.cli import main

    def call(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
        saved_logging, saved_disable = _logging_state(), logging.root.manager.disable
        saved_torch, saved_hydra_cfg = _torch_state(), HydraConfig.instance().cfg
        saved_sweeps = list(growrun.sweep._last_sweep_dir)
        earlier = capfd.readouterr()  # not this command's output
        try:
            os.environ.pop("GROWRUN_UID", None)
            os.environ.update(env or {})
            os.chdir(cwd)
            sys.argv = [str(Path(growrun.__file__).parent / "__main__.py"), *args]
            GlobalHydra.instance().clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    code = main(list(args))
                except SystemExit as ex:
                    if ex.code is None or isinstance(ex.code, int):
                        code = ex.code or 0
                    else:  # sys.exit("message"): printed to stderr, status 1
                        print(ex.code, file=sys.stderr)
                        code = 1
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = saved_hydra_cfg
            growrun.sweep._last_sweep_dir[:] = saved_sweeps
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            _restore_logging(saved_logging, saved_disable)
            _restore_torch(saved_torch)
        out, err = capfd.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                       for w in caught if not issubclass(w.category, _SILENT_BY_DEFAULT))
        sys.stdout.write(earlier.out + out)  # back into the test's captured output (shown if it fails)
        sys.stderr.write(earlier.err + err)
        return subprocess.CompletedProcess(["growrun", *args], code, out, err)

    return call
