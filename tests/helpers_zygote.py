"""`python -m growrun ARGS` as a real process, without its start-up: a warm "zygote".

A fresh `python -m growrun` spends ~4 s of CPU before its first step whatever it trains (import
torch; torch._dynamo, which torch's first Optimizer.add_param_group imports; Hydra). The tests
that need a real process (kills, signals, exit codes, stderr) start many. Each pytest process
keeps one zygote: a child interpreter that has paid for those imports once and forks a process
per command. The forked process is a real process with its own pid: it gets the command's argv,
working directory, environment, stdin (/dev/null), stdout and stderr (files, or the caller's
descriptors), a new session if asked, and exits with the status `python -m growrun` would
(growrun.cli.main's return code; 1 and a traceback for an uncaught exception; killed by a
signal: -signum, as subprocess reports). Things a fresh interpreter would read from its
environment at start-up are the zygote's (PYTHONPATH: the tests run the repository's growrun
either way), except OMP_NUM_THREADS: the zygote imports with one OpenMP thread (so that no thread
exists when it forks) and the forked process sets torch's thread count from the command's
environment, as OpenMP would.

    run(args, cwd=..., env=..., timeout=...)          like subprocess.run(capture_output=True, text=True)
    Process(args, cwd=..., env=..., stdout=PIPE, ...)  like subprocess.Popen(text=True)
    signal_when(proc, ready, signum)                   signal a Process once ready() holds, wait for it

`growrun resume` trains in a child process (growrun.child); in a forked process that child is
forked from it as well (its own pid and process group, signals forwarded as to a real one).

GROWRUN_TEST_ZYGOTE=0 (or a system without fork / descriptor passing) runs every command as
`sys.executable -m growrun` instead. Launcher jobs and torchrun ranks start their own
interpreters either way.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
HEADER = struct.Struct("!I")


# --- the zygote (this file run as a script) --------------------------------------------------------

# What every growrun command imports (torch._dynamo: by torch's first Optimizer.add_param_group;
# torch._inductor.config: by torch.use_deterministic_algorithms).
WARM = ("torch", "torch._dynamo", "torch._inductor.config", "torchvision", "hydra._internal.utils", "growrun.cli",
        "growrun.config.precheck", "growrun.config.store", "growrun.report", "growrun.train.run")


def _warm() -> str:
    """Import WARM; return the warnings a fresh start would print (default filters)."""
    import importlib
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        for name in WARM:
            importlib.import_module(name)
    return "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)


def _child(request: dict, fds: list[int], closing: list[socket.socket]) -> None:
    """In the forked process: become `python -m growrun ARGS`, then exit with its status."""
    code = 1
    try:
        for s in closing:
            s.close()
        if request["new_session"]:
            os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (null, *fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import growrun.child

        sys.stderr.write(request["warnings"])
        growrun.child.subprocess = _ForkingSubprocess  # `growrun resume`'s training child: forked too
        code = _main(request["args"], request.get("source"))
    finally:
        _exit(code)


def _main(args: list[str], source: str | None = None) -> int:
    """growrun.cli.main(args) run to the end as `python -m growrun ARGS` would be (with source:
    `python -c SOURCE ARGS`): its exit status (1 and a traceback for an uncaught exception), the
    threads joined and the atexit functions run."""
    import torch

    import growrun.cli

    if args[:1] != ["resume"]:  # (resume trains in a forked child: torch's thread pool would stop the fork)
        # what a fresh interpreter's OpenMP would take from this environment (the zygote has 1)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else len(os.sched_getaffinity(0)))
    sys.argv = ["-c" if source else str(Path(growrun.cli.__file__).with_name("__main__.py")), *args]
    try:
        if source:
            exec(compile(source, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
            code = 0
        else:
            code = growrun.cli.main(args)
    except SystemExit as ex:
        if ex.code is None or isinstance(ex.code, int):
            code = ex.code or 0
        else:
            print(ex.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        import traceback

        traceback.print_exc()
        code = 1
    import threading

    threading._shutdown()  # what the interpreter does at exit: join the threads, run their exit hooks,
    atexit._run_exitfuncs()  # then the atexit functions (e.g. joblib's executor shut down)
    return code


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class _Forked:
    """The part of subprocess.Popen that growrun.child uses, for `python -m growrun ARGS` forked
    from this process (already a forked zygote: warm, one thread). The forked process gets a new
    process group if asked (process_group=0) and a fresh interpreter's signal handlers; it shares
    this process's stdio, working directory and environment, as Popen without them would."""

    def __init__(self, command: list[str], process_group: int | None = None):
        self.args, self.returncode = command, None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                if process_group == 0:
                    os.setpgid(0, 0)
                import growrun.child

                for signum in growrun.child.FORWARDED:  # SignalForwarder's handlers are this process's
                    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
                code = _main(command[3:])
            finally:
                _exit(code)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)


class _ForkingSubprocess:
    """Stands for the subprocess module in growrun.child inside a forked process: a `python -m
    growrun` command is forked (_Forked) when this process has one thread; anything else is a real Popen."""

    @staticmethod
    def Popen(command: list[str], **kwargs):  # noqa: N802  (subprocess.Popen's name)
        forkable = command[:3] == [sys.executable, "-m", "growrun"] and set(kwargs) <= {"process_group"} \
            and len(os.listdir("/proc/self/task")) == 1
        return _Forked(command, **kwargs) if forkable else subprocess.Popen(command, **kwargs)


def serve(path: str) -> None:
    warnings_text = _warm()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork would copy a process whose other threads (OpenMP's) are gone
        raise SystemExit(f"zygote: {threads} threads after the imports; cannot fork safely")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    parent = os.getppid()
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            request["warnings"] = warnings_text
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, fds, [listener, conn, *waiting.values()])
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass  # the test process gave up on it
                conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("zygote: truncated request")
        data += more
    return json.loads(data[HEADER.size:].decode()), list(fds)


# --- the client (the tests' side) ------------------------------------------------------------------

class _Zygote:
    """This pytest process's zygote, started on first use and stopped at exit."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="growrun-zygote-")
        self.path = os.path.join(self.dir, "socket")
        self.log = open(os.path.join(self.dir, "zygote.log"), "w+")  # noqa: SIM115
        # one OpenMP thread while it imports: torch starts no thread then, so forking is safe
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=DEVNULL, stdout=PIPE,
                                     stderr=self.log, text=True, cwd=str(Path(__file__).parent), env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.log.seek(0)
            raise RuntimeError(f"the growrun test zygote did not start: {self.log.read()[-2000:]}")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def spawn(self, args: list[str], cwd: str, env: dict, out_fd: int, err_fd: int,
              new_session: bool, source: str | None = None) -> tuple[socket.socket, int]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        body = json.dumps({"args": args, "cwd": cwd, "env": env, "new_session": new_session, "source": source}).encode()
        message = HEADER.pack(len(body)) + body
        sent = socket.send_fds(conn, [message], [out_fd, err_fd])
        if sent < len(message):
            conn.sendall(message[sent:])
        return conn, int(_read_line(conn, None))


_ZYGOTE: _Zygote | None = None


def _zygote() -> _Zygote | None:
    global _ZYGOTE
    if os.environ.get("GROWRUN_TEST_ZYGOTE", "1") == "0" or not hasattr(socket, "send_fds") \
            or not Path("/proc/self/task").is_dir():
        return None
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = _Zygote()
    return _ZYGOTE


def _read_line(conn: socket.socket, timeout: float | None) -> str | None:
    """One status line from the zygote; None if none arrived within timeout seconds."""
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([conn], [], [], left)[0]:
            if data:
                continue
            return None
        more = conn.recv(64)
        if not more:
            raise RuntimeError("the growrun test zygote died")
        data += more
    return data.decode()


class Process:
    """`subprocess.Popen([sys.executable, "-m", "growrun", *args], text=True, ...)` from the zygote
    (with source: `[sys.executable, "-c", source, *args]`). stdout / stderr: PIPE (a temporary
    file, readable as .stdout / .stderr, and by communicate()), DEVNULL, None (this process's
    own), a file or descriptor; stderr also STDOUT."""

    def __init__(self, args, *, cwd, env: dict | None = None, stdout=None, stderr=None,
                 start_new_session: bool = False, source: str | None = None):
        self.args = [str(a) for a in args]
        self.returncode: int | None = None
        self.stdout = self.stderr = None
        zygote = _zygote()
        if zygote is None:
            head = ["-c", source] if source else ["-m", "growrun"]
            self._popen = subprocess.Popen([sys.executable, *head, *self.args], cwd=cwd, env=env,
                                           stdout=stdout, stderr=stderr, text=True,
                                           start_new_session=start_new_session)
            self.pid, self.stdout, self.stderr = self._popen.pid, self._popen.stdout, self._popen.stderr
            return
        self._popen = None
        fds = []
        for target, own, name in ((stdout, 1, "stdout"), (stderr, 2, "stderr")):
            if target == PIPE:
                f = tempfile.TemporaryFile("w+")
                setattr(self, name, f)
                fds.append(f.fileno())
            elif target == DEVNULL:
                fds.append(os.open(os.devnull, os.O_WRONLY))
            elif target is None:
                fds.append(own)
            elif target == STDOUT:
                fds.append(fds[0])
            else:
                fds.append(target.fileno() if hasattr(target, "fileno") else target)
        try:
            self._conn, self.pid = zygote.spawn(self.args, str(cwd), dict(os.environ if env is None else env),
                                                fds[0], fds[1], start_new_session, source)
        finally:
            for target, fd in zip((stdout, stderr), fds):
                if target == DEVNULL:
                    os.close(fd)

    def poll(self) -> int | None:
        return self.wait(0, raise_timeout=False)

    def wait(self, timeout: float | None = None, *, raise_timeout: bool = True) -> int | None:
        if self._popen is not None:
            self.returncode = self._popen.wait(timeout) if raise_timeout else self._popen.poll()
            return self.returncode
        if self.returncode is None:
            line = _read_line(self._conn, timeout)
            if line is None:
                if raise_timeout:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return None
            self.returncode = int(line)
            self._conn.close()
            for f in (self.stdout, self.stderr):
                if f is not None:
                    f.seek(0)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        if self._popen is not None:
            out, err = self._popen.communicate(timeout=timeout)
            self.returncode = self._popen.returncode
            return out, err
        self.wait(timeout)
        return tuple(f.read() if f is not None else None for f in (self.stdout, self.stderr))

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def signal_when(proc: Process, ready, signum: int, timeout: float = 300) -> tuple[str | None, str | None]:
    """Wait until ready() is true while proc runs (poll every 20 ms), send it signum, and return
    its communicate() once it has ended; AssertionError if it ends first or takes too long."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc.communicate(timeout=120)


def module_source(module: str) -> str:
    """source= that makes `python -c SOURCE ARGS` run as `python -m MODULE ARGS`."""
    return f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"


def script_source(path: Path) -> str:
    """source= that makes `python -c SOURCE ARGS` run as `python PATH ARGS` (its directory first on
    sys.path, as python puts it)."""
    return f"import runpy, sys; sys.path.insert(0, {str(Path(path).parent)!r}); " \
           f"runpy.run_path({str(path)!r}, run_name='__main__')"


def run(args, *, cwd, env: dict | None = None, timeout: float | None = None,
        source: str | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, "-m", "growrun", *args], capture_output=True, text=True, ...)`
    (with source: `[sys.executable, "-c", source, *args]`)."""
    proc = Process(args, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, source=source)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(["growrun", *proc.args], proc.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1])
