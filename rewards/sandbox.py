"""Runs model-written P-CoT programs safely: a pool of sandbox worker processes.

A P-CoT sample is a program whose ``solution()`` returns the answer. Programs written by a model are
hostile input, so they never run in this process. A `ProgramSandbox` owns N worker processes
(``_sandbox_worker.py``: small, single-threaded, started clean with ``python -I`` and a scrubbed
environment, because this host may be a big multithreaded Ray actor that must never fork itself).
For each program a worker forks a fresh child, confines the child (a private tmpfs and IPC namespace,
rlimits, uid nobody, Landlock, a seccomp allow-list, no ctypes, an audit hook: see the worker's
docstring) and reports one `ExecResult`.

Host side: every worker belongs to one thread at a time (a queue of idle workers); `run_many`
spreads programs over all of them. Every read from a worker has a deadline (the program's timeout
plus a margin); a worker that dies or hangs is killed and replaced, and only the program it was
running is charged for it. Killing a worker kills its whole session: the program it runs too.

    with ProgramSandbox(num_workers=4) as sandbox:
        results = sandbox.run_many(programs)     # list[ExecResult], in input order

``namespace="paper"`` runs programs as the paper's code does (``math`` and ``sympy`` given, a
separate locals dict; the worker's ``execute``) and reports ``float()`` of the value as well.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from rewards._sandbox_worker import NAMESPACES, remove_tree

log = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "timeout", "error", "killed")

_WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
_WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}   # nothing of the host's environment
_REPLY_MARGIN_S = 5.0       # a worker answers within the program's timeout plus this, or is killed
_STARTUP_TIMEOUT_S = 60.0
_MAX_REPLY_BYTES = 1 << 20
_DETAIL_CHARS = 300


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0      # wall AND cpu limit per program (paper: 10 s)
    memory_mb: int = 1024        # RLIMIT_AS
    output_bytes: int = 1 << 16  # cap on what the program may print (RLIMIT_FSIZE on a private file)
    max_open_files: int = 64
    scratch_mb: int = 8          # the program's only writable space: a private tmpfs of this size


@dataclasses.dataclass(frozen=True)
class ExecResult:
    status: str            # one of STATUSES
    answer: Optional[str]  # only for "ok": solution()'s value as text, at most 256 chars
                           # (namespace "paper": str(value) lower-cased, quotes removed, stripped)
    detail: str = ""       # short human reason: exception, signal, "blocked: os.system", ...
    seconds: float = 0.0   # wall time of the program
    number: Optional[float] = None   # namespace "paper", "ok" only: float(value), None if float() raised


class _WorkerFailure(Exception):
    """A worker died, hung or broke the protocol. `status` is what the program in flight gets;
    `delivered` says whether the worker may have started it (if not, it can be retried)."""

    def __init__(self, status: str, detail: str, delivered: bool = True):
        super().__init__(detail)
        self.status = status
        self.delivered = delivered


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session `sid`. A program stays in its worker's session (seccomp
    refuses setsid), so this ends it even if it lost its parent-death signal."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()   # state ppid pgrp session ...
            if int(fields[3]) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass


def _wait(poller: select.poll, deadline: float, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
        raise _WorkerFailure("timeout", f"sandbox worker did not {what} in time")


class _Worker:
    """One worker process and its two pipes (non-blocking, always used with a deadline)."""

    def __init__(self, limits: SandboxLimits, tmp_root: str):
        config = {"memory_mb": limits.memory_mb, "output_bytes": limits.output_bytes,
                  "max_open_files": limits.max_open_files, "scratch_mb": limits.scratch_mb,
                  "tmp_root": tmp_root}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", _WORKER_SCRIPT, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_WORKER_ENV,
            close_fds=True, start_new_session=True)
        self._to_worker, self._from_worker = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._to_worker, False)
        os.set_blocking(self._from_worker, False)
        try:
            self.capabilities = self._receive(time.monotonic() + _STARTUP_TIMEOUT_S)
        except BaseException:
            self.dispose()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def execute(self, program: str, timeout_s: float, namespace: str = "plain") -> ExecResult:
        deadline = time.monotonic() + timeout_s + _REPLY_MARGIN_S
        self._send({"program": program, "timeout_s": timeout_s, "namespace": namespace}, deadline)
        reply = self._receive(deadline)
        status, number = reply.get("status"), reply.get("number")
        if status not in STATUSES or not (number is None or isinstance(number, str)):
            raise _WorkerFailure("error", f"bad reply from sandbox worker: {reply!r}"[:_DETAIL_CHARS])
        if status == "ok" and number is not None:
            try:
                number = float(number)
            except ValueError:
                raise _WorkerFailure("error", f"bad number from sandbox worker: {number!r}"[:_DETAIL_CHARS]) from None
        return ExecResult(status=status,
                          answer=reply.get("answer") if status == "ok" else None,
                          detail=str(reply.get("detail", ""))[:_DETAIL_CHARS],
                          seconds=float(reply.get("seconds", 0.0)),
                          number=number if status == "ok" else None)

    def kill(self) -> None:
        """SIGKILL the worker and every process of its session (the program it runs), and reap
        it. Safe from any thread; the pipes stay open for the thread that owns the worker."""
        if self.proc.returncode is None:    # not reaped, so its pid (the session id) is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_session(self.proc.pid)
        self.proc.wait()

    def dispose(self) -> None:
        """Kill the worker and close its pipes; only by its owner (or when nobody owns it)."""
        self.kill()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def _send(self, message: dict, deadline: float) -> None:
        body = json.dumps(message).encode()
        data = memoryview(struct.pack(">I", len(body)) + body)
        poller = select.poll()
        poller.register(self._to_worker, select.POLLOUT)
        try:
            while data:
                _wait(poller, deadline, "take the program")
                try:
                    data = data[os.write(self._to_worker, data):]
                except BlockingIOError:
                    continue
        except (BrokenPipeError, _WorkerFailure) as exc:
            # Nothing (or part of a message) reached the worker: the program did not start.
            raise _WorkerFailure("killed", f"sandbox worker died: {exc}", delivered=False) from exc

    def _receive(self, deadline: float) -> dict:
        poller = select.poll()
        poller.register(self._from_worker, select.POLLIN)
        (size,) = struct.unpack(">I", self._read_exactly(4, poller, deadline))
        if size > _MAX_REPLY_BYTES:
            raise _WorkerFailure("error", f"sandbox worker sent a {size}-byte reply")
        try:
            message = json.loads(self._read_exactly(size, poller, deadline))
        except ValueError as exc:
            raise _WorkerFailure("error", f"bad reply from sandbox worker: {exc}") from exc
        if not isinstance(message, dict):
            raise _WorkerFailure("error", "bad reply from sandbox worker: not an object")
        return message

    def _read_exactly(self, size: int, poller: select.poll, deadline: float) -> bytes:
        data = b""
        while len(data) < size:
            _wait(poller, deadline, "answer")
            try:
                chunk = os.read(self._from_worker, size - len(data))
            except BlockingIOError:
                continue
            if not chunk:
                raise _WorkerFailure("killed", "sandbox worker died")
            data += chunk
        return data


_warned_problems: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(problems: Sequence[str]) -> None:
    """Missing protection layers, logged once per process (seccomp as a warning)."""
    with _warned_lock:
        for problem in problems:
            if problem not in _warned_problems:
                _warned_problems.add(problem)
                level = logging.WARNING if problem.startswith("seccomp") else logging.INFO
                log.log(level, "program sandbox runs without a layer: %s", problem)


def _shutdown(workers: set, executor: ThreadPoolExecutor, tmp_root: str) -> None:
    """Kill every worker and delete the temp root (close(), or garbage collection / exit)."""
    for worker in list(workers):
        worker.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    remove_tree(tmp_root)          # depth-safe, never raises


class ProgramSandbox:
    """A pool of sandbox workers. Thread-safe: `run` and `run_many` may be called from any thread."""

    def __init__(self, num_workers: Optional[int] = None, limits: SandboxLimits = SandboxLimits()):
        self.limits = limits
        self.num_workers = num_workers or os.cpu_count() or 1
        # Per-program temp dirs live under this root: root-owned, and only traversable (0o711) so
        # that a program running as nobody can reach its own dir but not list the others.
        self._tmp_root = tempfile.mkdtemp(prefix="reft-sandbox-")
        os.chmod(self._tmp_root, 0o711)
        self._lock = threading.Lock()
        self._closed = False
        self._workers: set[_Worker] = set()
        # Idle slots: a worker, or None for a slot whose worker has to be (re)started.
        self._idle: queue.SimpleQueue[Optional[_Worker]] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sandbox")
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._executor, self._tmp_root)
        try:
            started = list(self._executor.map(lambda _: self._start_worker(), range(self.num_workers)))
        except BaseException:
            self.close()
            raise
        for worker in started:
            self._idle.put(worker)
        self.capabilities: dict = started[0].capabilities   # what the layers probe found

    @property
    def worker_pids(self) -> list[int]:
        with self._lock:
            return sorted(worker.pid for worker in self._workers)

    def run(self, program: str, timeout_s: Optional[float] = None, namespace: str = "plain") -> ExecResult:
        """Run one program and call its solution(); never raises for anything the program does.
        ``namespace``: "plain" (a module of its own) or "paper" (module docstring)."""
        timeout_s = float(self.limits.timeout_s if timeout_s is None else timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if namespace not in NAMESPACES:
            raise ValueError(f"namespace must be one of {NAMESPACES}, got {namespace!r}")
        start = time.monotonic()
        try:
            try:
                return self._run_on_a_worker(program, timeout_s, namespace)
            except _WorkerFailure as exc:
                if exc.delivered:
                    raise
                # The worker was gone before it got the program: nothing ran, try a fresh one.
                return self._run_on_a_worker(program, timeout_s, namespace)
        except _WorkerFailure as exc:
            return ExecResult(exc.status, None, str(exc)[:_DETAIL_CHARS], time.monotonic() - start)

    def run_many(self, programs: Sequence[str], timeout_s: Optional[float] = None,
                 namespace: str = "plain") -> list[ExecResult]:
        """Run programs in parallel over all workers; results in input order."""
        return list(self._executor.map(lambda program: self.run(program, timeout_s, namespace), programs))

    def close(self) -> None:
        """Kill all workers (programs in flight end as "killed") and delete the temp dirs. Idempotent."""
        with self._lock:
            self._closed = True
            idle = []
            while not self._idle.empty():
                idle.append(self._idle.get())
            self._idle.put(None)     # wakes a thread waiting in _acquire, which then raises
        for worker in idle:
            if worker is not None:
                worker.dispose()
        self._finalizer()            # busy workers are killed here and disposed by their owners

    def __enter__(self) -> "ProgramSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker slots
    def _run_on_a_worker(self, program: str, timeout_s: float, namespace: str) -> ExecResult:
        worker = self._acquire()
        healthy = False
        try:
            result = worker.execute(program, timeout_s, namespace)
            healthy = True
            return result
        finally:
            self._release(worker, healthy)

    def _start_worker(self) -> _Worker:
        worker = _Worker(self.limits, self._tmp_root)
        _warn_once(worker.capabilities.get("problems", []))
        with self._lock:
            self._workers.add(worker)
        return worker

    def _acquire(self) -> _Worker:
        worker = self._idle.get()
        if self._closed:
            if worker is not None:   # taken just before close() emptied the queue
                self._forget(worker)
            self._idle.put(None)     # pass the wake-up on to the next waiter
            raise RuntimeError("ProgramSandbox is closed")
        if worker is not None and not worker.alive():   # killed while idle (OOM killer, an admin)
            self._forget(worker)
            worker = None
        if worker is None:
            try:
                worker = self._start_worker()
            except BaseException:
                self._idle.put(None)
                raise
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            keep = healthy and not self._closed
            if keep:
                self._idle.put(worker)
        if not keep:
            self._forget(worker)
            self._idle.put(None)

    def _forget(self, worker: _Worker) -> None:
        worker.dispose()
        with self._lock:
            self._workers.discard(worker)
