"""Tests of the P-CoT program sandbox (rewards/sandbox.py, rewards/_sandbox_worker.py).

Most tests share one pool of 2 workers with a 2 s limit. The adversarial suite runs hostile
programs and checks, for each: it is not scored "ok" (or its answer carries nothing harmful), its
result arrives within the time limit plus a small margin, the host's files, /tmp and network are
untouched, and the same pool then still scores a good program correctly.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards import sandbox as sandbox_module
from rewards.sandbox import (
    STATUSES,
    ExecResult,
    ProgramSandbox,
    SandboxLimits,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

TIMEOUT_S = 2.0
MARGIN_S = 1.5        # a result must arrive within TIMEOUT_S + MARGIN_S
WORKER_SCRIPT = Path(sandbox_module.__file__).with_name("_sandbox_worker.py")
CANARY_TEXT = "canary: do not touch\n"

GOOD_PROGRAM = '''
def solution():
    """Iesha has 344 books. 136 are about school and the rest are about sports. How many books
    about sports does Iesha have?"""
    num_books_total = 344
    num_books_school = 136
    result = num_books_total - num_books_school
    return result
'''


def solution(body: str) -> str:
    """A program whose solution() runs `body`."""
    return "def solution():\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


@pytest.fixture(scope="module")
def sandbox():
    with ProgramSandbox(num_workers=2, limits=SandboxLimits(timeout_s=TIMEOUT_S)) as pool:
        yield pool


def assert_scores_good_program(pool: ProgramSandbox) -> None:
    result = pool.run(GOOD_PROGRAM)
    assert (result.status, result.answer) == ("ok", "208"), result


# ------------------------------------------------------------------------------ good programs
SVAMP_PROGRAM = '''
def solution():
    """Paco had 26 salty cookies and 17 sweet cookies. He ate 14 sweet cookies and 9 salty
    cookies. How many salty cookies did Paco have left?"""
    salty_cookies_initial = 26
    salty_cookies_eaten = 9
    salty_cookies_left = salty_cookies_initial - salty_cookies_eaten
    result = salty_cookies_left
    return result
'''


@pytest.mark.parametrize("program, status, answer", [
    pytest.param(GOOD_PROGRAM, "ok", "208", id="int"),
    pytest.param(SVAMP_PROGRAM, "ok", "17", id="svamp"),
    pytest.param(solution("return 5 / 2"), "ok", "2.5", id="float"),
    pytest.param(solution("return 'twelve'"), "ok", "twelve", id="str"),
    pytest.param(solution("return 3 > 2"), "ok", "True", id="bool"),
    pytest.param(solution("import fractions\nreturn fractions.Fraction(5, 2)"), "ok", "2.5",
                 id="fraction-as-float"),
    pytest.param(solution("return [1, 2]"), "ok", "[1, 2]", id="list-as-repr"),
    pytest.param(solution("return 'y' * 1000"), "ok", "y" * 256, id="answer-capped"),
    pytest.param(solution("x = 1"), "no_answer", None, id="none"),
    pytest.param(solution("import math\nreturn math.floor(math.sqrt(50))"), "ok", "7", id="import-math"),
    pytest.param(solution("""
        import datetime, itertools, re, collections, statistics
        days = (datetime.date(2024, 3, 1) - datetime.date(2024, 2, 1)).days
        pairs = len(list(itertools.combinations(range(5), 2)))
        digits = len(re.findall(r"\\d", "a1b22"))
        common = collections.Counter("aab").most_common(1)[0][1]
        return days + pairs + digits + common + statistics.mean([1, 3])"""), "ok", "46",
                 id="stdlib-modules"),
    pytest.param(solution("""
        with open("scratch.txt", "w") as f:
            f.write("41")
        return int(open("scratch.txt").read()) + 1"""), "ok", "42", id="private-dir-writable"),
    pytest.param(solution("print('chatty'); return 1"), "ok", "1", id="print-is-fine"),
    pytest.param("def solution(:\n    return 1\n", "error", None, id="syntax-error"),
    pytest.param("x = 1\n", "error", None, id="no-solution"),
    pytest.param(solution("return 1 / 0"), "error", None, id="exception"),
])
def test_good_programs(sandbox, program, status, answer):
    result = sandbox.run(program)
    assert result.status in STATUSES
    assert (result.status, result.answer) == (status, answer), result
    assert result.seconds < TIMEOUT_S


def test_error_details(sandbox):
    assert sandbox.run("def solution(:\n").detail.startswith("SyntaxError")
    assert sandbox.run("x = 1\n").detail == "the program defines no solution()"
    assert sandbox.run(solution("return 1 / 0")).detail == "ZeroDivisionError: division by zero"


def test_state_does_not_leak_between_programs(sandbox):
    first = solution("import math\nmath.pi = 3\nopen('left.txt', 'w').write('x')\nreturn math.pi")
    second = solution("import math, os\nreturn f'{math.pi:.2f} {os.path.exists(\"left.txt\")}'")
    assert sandbox.run(first).answer == "3"
    for _ in range(2):   # whichever worker runs it
        assert sandbox.run(second).answer == "3.14 False"


def test_a_pool_of_one_runs_a_program():
    with ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=TIMEOUT_S)) as one:
        result = one.run(GOOD_PROGRAM)
    assert isinstance(result, ExecResult) and (result.status, result.answer) == ("ok", "208")


# ------------------------------------------------------------------------------ the paper's namespace
@pytest.mark.parametrize("program, status, answer, number", [
    pytest.param(GOOD_PROGRAM, "ok", "208", 208.0, id="int"),
    pytest.param(solution("return math.floor(math.sqrt(50))"), "ok", "7", 7.0, id="math-given"),
    pytest.param(solution("return sympy.Rational(1, 4)"), "ok", "1/4", 0.25, id="sympy-given"),
    pytest.param(solution("x = sympy.Symbol('x')\nreturn sympy.solve(x - 3, x)[0]"), "ok", "3", 3.0,
                 id="sympy-solve"),
    pytest.param(solution("return 3 > 2"), "ok", "true", 1.0, id="bool"),
    pytest.param(solution("return ' 5 '"), "ok", "5", 5.0, id="str-number"),
    pytest.param(solution("return \"'C'\""), "ok", "c", None, id="mcq-text"),
    pytest.param(solution("x = 1"), "ok", "none", None, id="none"),
    pytest.param(solution("return [1, 2]"), "ok", "[1, 2]", None, id="list"),
    pytest.param(solution("return float('nan')"), "ok", "nan", float("nan"), id="nan"),
    pytest.param("X = 3\n" + solution("return X"), "error", None, None, id="top-level-name-in-locals"),
    pytest.param("x = 1\n", "error", None, None, id="no-solution"),
])
def test_paper_namespace(sandbox, program, status, answer, number):
    """src/python_engine.py::run: globals {math, sympy}, separate locals, eval("solution()")."""
    result = sandbox.run(program, namespace="paper")
    assert (result.status, result.answer) == (status, answer), result
    assert result.number == number or (number != number and result.number != result.number), result
    if status == "error":
        assert "NameError" in result.detail
    assert sandbox.run(solution("return math.pi")).status == "error"   # "plain" gives nothing


def test_unknown_namespace_is_refused(sandbox):
    with pytest.raises(ValueError, match="namespace must be one of"):
        sandbox.run(GOOD_PROGRAM, namespace="official")


# ------------------------------------------------------------------------------ adversarial suite
@dataclasses.dataclass
class Host:
    """What a hostile program must not be able to reach."""
    dir: Path                 # world-writable, so that only the sandbox's layers protect it
    canary: Path              # mode 0o666, known content
    pwned: Path               # a fresh path in /tmp that must never come to exist
    listener: socket.socket   # must never accept a connection
    port: int


@pytest.fixture
def host():
    # Not pytest's tmp_path: its parents are 0o700, so `nobody` could not even reach a canary there
    # and the test would prove nothing about the sandbox's own layers.
    directory = Path(tempfile.mkdtemp(prefix="reft-canary-"))
    directory.chmod(0o777)
    canary = directory / "canary.txt"
    canary.write_text(CANARY_TEXT)
    canary.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    yield Host(directory, canary, Path(tempfile.gettempdir()) / f"reft-pwned-{uuid.uuid4().hex}",
               listener, listener.getsockname()[1])
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


# (id, program template, allowed statuses, text the detail must contain). Templates see the Host
# fields and `worker_script`.
ADVERSARIAL = [
    ("infinite-loop", "while True:\n    pass", {"timeout"}, ""),
    ("ignores-sigxcpu-and-sigterm", """
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            pass""", {"timeout"}, ""),
    ("sleep-forever", "import time\ntime.sleep(10**6)", {"timeout"}, "wall-clock"),
    ("memory-bomb", "x = bytearray(10**10)", {"error"}, "MemoryError"),
    # RLIMIT_AS stops it (MemoryError or a kill); on a loaded machine the 1 GiB of 10 MB steps can
    # take longer than the 2 s wall limit, which stops it as well.
    ("memory-growing-list", "x = []\nwhile True:\n    x.append(bytearray(10**7))",
     {"error", "killed", "timeout"}, ""),
    ("fork-bomb", "import os\nwhile True:\n    os.fork()", {"error"}, "blocked: os.fork"),
    ("os-system", "import os\nos.system('touch {pwned}')\nreturn 1", {"error"}, "blocked: os.system"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'touch {pwned}'])\nreturn 1",
     {"error"}, "blocked: subprocess.Popen"),
    ("remove-host-file", "import os\nos.remove('{canary}')\nreturn 1", {"error"}, "blocked: os.remove"),
    ("overwrite-host-file", "open('{canary}', 'w').write('pwned')\nreturn 1", {"error"}, "blocked: open"),
    ("rename-host-file", "import os\nos.rename('{canary}', '{dir}/moved')\nreturn 1",
     {"error"}, "blocked: os.rename"),
    ("create-file-in-tmp", "open('{pwned}', 'w').write('x')\nreturn 1", {"error"}, "blocked: open"),
    ("relative-path-escape", "open('../../../../../../..{pwned}', 'w').write('x')\nreturn 1",
     {"error"}, "blocked: open"),
    ("dir-fd-escape", """
        import os
        fd = os.open('{pwned.parent}', os.O_PATH)    # O_PATH: Landlock refuses to read /tmp
        os.close(os.open('{pwned.name}', os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        return 1""", {"error"}, "blocked: os.open"),
    ("chdir-escape", "import os\nos.chdir('{pwned.parent}')\nopen('{pwned.name}', 'w')\nreturn 1",
     {"error"}, "blocked: os.chdir"),
    ("symlink-escape", "import os\nos.symlink('{canary}', 'link')\nopen('link', 'w').write('pwned')",
     {"error"}, "blocked: os.symlink"),
    ("append-to-sandbox-source", "open('{worker_script}', 'a').write('pwned')", {"error"}, "blocked"),
    ("socket-connect", """
        import socket
        socket.create_connection(('127.0.0.1', {port}), timeout=1)
        return 1""", {"error"}, "blocked: socket"),
    ("raw-socket", "import _socket\n_socket.socket()\nreturn 1", {"error"}, "blocked: socket"),
    ("huge-output", "print('x' * 10**9)\nreturn 1", {"error", "timeout", "killed"}, ""),
    ("output-loop", "while True:\n    print('x' * 1000)", {"error"}, "File too large"),
    ("deep-recursion", """
        import sys
        sys.setrecursionlimit(10**6)
        def f(n):
            return f(n + 1) + 1
        return f(0)""", {"error", "killed", "timeout"}, ""),
    ("c-stack-overflow", """
        import sys
        sys.setrecursionlimit(10**6)
        class A:
            def __repr__(self):
                return repr(self)
        return repr(A())""", {"killed", "error"}, ""),
    ("thread-bomb", """
        import threading
        while True:
            threading.Thread(target=lambda: None).start()""", {"error"}, "can't start new thread"),
    ("kill-parent", "import os\nos.kill(os.getppid(), 9)\nreturn 1", {"error"}, "blocked: os.kill"),
    ("killpg-own-group", "import os\nos.killpg(0, 9)\nreturn 1", {"error"}, "blocked: os.kill"),
    ("sys-exit", "import sys\nsys.exit(0)", {"error"}, "SystemExit"),
    ("os-exit", "import os\nos._exit(0)", {"killed"}, "without a result"),
    ("ctypes-segfault", "import ctypes\nreturn ctypes.string_at(0)", {"error"}, "blocked: import"),
    ("crafted-bytecode", "return (lambda: 0).__code__.replace(co_code=b'')", {"error"},
     "blocked: code.__new__"),
    ("reach-the-hook-via-gc", "import gc\nreturn len(gc.get_objects())", {"error"}, "blocked: gc"),
    ("memory-corrupting-test-module", "import _testcapi\nreturn 1", {"error"}, "blocked: import"),
    ("raise-own-cpu-limit", """
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (100, 100))
        while True:
            pass""", {"error", "timeout"}, ""),
    ("tamper-with-the-hook", """
        import builtins, os, sys
        worker = sys.modules['__main__']
        worker.BLOCKED_EVENTS, worker.WRITE_FLAGS, worker.FS_EVENTS = frozenset(), 0, ()
        os.path.realpath = os.path.abspath = lambda path: worker.__file__
        builtins.type = lambda obj: int
        open('{pwned}', 'w').write('x')
        return 1""", {"error"}, "blocked: open"),
    ("forge-result", "import os\nos.write(3, b'garbage')\nos._exit(0)", {"error"}, "malformed"),
    # sympy is preloaded (the paper's runner gives it to every program): what it imported from
    # ctypes is gone, and what it can start is refused like anything else.
    ("sympy-ctypes-memory", "import sympy\nreturn sympy.external.gmpy.c_long.from_address(id(1)).value",
     {"error"}, "has no attribute"),
    ("sympy-eval", "import sympy\nreturn sympy.sympify(\"__import__('os').system('touch {pwned}')\")",
     {"error"}, "blocked: os.system"),
]


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat after the command's parentheses: state ppid pgrp session ..."""
    return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()


def nobody_pids() -> set[int]:
    """The processes of the sandbox uid that this test process's pools may have started. A program
    stays in its worker's session (seccomp refuses setsid) and each worker, our child, leads its own;
    a session whose leader is alive and someone else's child belongs to another process's sandbox
    (another test run on the machine). A program whose leader is gone counts: it may be a leak."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if not (entry.name.isdigit() and "\nUid:\t65534" in (entry / "status").read_text()):
                continue
            session = int(_stat_fields(int(entry.name))[3])
            try:
                foreign = int(_stat_fields(session)[1]) != os.getpid()
            except OSError:
                foreign = False
            if not foreign:
                pids.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    return pids


@pytest.mark.parametrize("namespace", ["plain", "paper"])
@pytest.mark.parametrize("template, statuses, detail",
                         [pytest.param(*case[1:], id=case[0]) for case in ADVERSARIAL])
def test_adversarial_program(sandbox, host, template, statuses, detail, namespace):
    """Every hostile program, run both ways (the paper's namespace gives it math and sympy)."""
    program = solution(template.format(**vars(host), worker_script=WORKER_SCRIPT))
    pids_before = nobody_pids()
    script_before = WORKER_SCRIPT.read_bytes()

    start = time.monotonic()
    result = sandbox.run(program, namespace=namespace)
    elapsed = time.monotonic() - start

    assert result.status in statuses and detail in result.detail, result
    assert elapsed < TIMEOUT_S + MARGIN_S
    # The host is untouched: files, /tmp, the network, processes.
    assert host.canary.read_text() == CANARY_TEXT
    assert host.canary.stat().st_mode & 0o777 == 0o666
    assert sorted(p.name for p in host.dir.iterdir()) == ["canary.txt"]
    assert not host.pwned.exists()
    assert WORKER_SCRIPT.read_bytes() == script_before
    with pytest.raises(socket.timeout):
        host.listener.accept()
    assert nobody_pids() <= pids_before, "a sandboxed process outlived its program"
    assert_scores_good_program(sandbox)


def test_adversarial_suite_is_large_enough():
    assert len(ADVERSARIAL) >= 15


def test_secret_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("REFT_TEST_SECRET", "s3cr3t")   # before the workers start
    with ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=TIMEOUT_S)) as fresh:
        # The program looks at its own environment, its worker's and, when it runs as another
        # user than the host (root hosts), the host's. A host that is not root shares its uid
        # with the programs, and its /proc/<pid>/environ is then readable: a known limitation.
        pids = ["'self'", "os.getppid()"] + [str(os.getpid())] * fresh.capabilities["drops_privileges"]
        result = fresh.run(solution(f"""
            import os
            sources = {{"os.environ": lambda: str(dict(os.environ))}}
            for pid in ({", ".join(pids)},):
                path = f"/proc/{{pid}}/environ"
                sources[path] = lambda path=path: open(path, "rb").read().decode(errors="replace")
            report = []
            for name, read in sources.items():
                try:
                    report.append(("LEAK " if "s3cr3t" in read() else "clean ") + name)
                except OSError:
                    report.append("unreadable " + name)
            return "; ".join(report)"""))
    assert result.status == "ok", result
    assert "s3cr3t" not in result.answer and "LEAK" not in result.answer, result.answer
    assert "clean os.environ" in result.answer    # it could look, and found nothing


# ------------------------------------------------------------------------------ second red team
def needs(pool: ProgramSandbox, layer: str) -> None:
    """Skip, saying why, when this machine lacks a layer a test is about."""
    caps = pool.capabilities
    available = {"landlock": caps["landlock_abi"] > 0, "seccomp": caps["seccomp"],
                 "private_scratch": caps["private_scratch"], "nobody": caps["drops_privileges"]}
    if not available[layer]:
        pytest.skip(f"this machine has no {layer} layer: {caps['problems']}")


@pytest.mark.parametrize("namespace", ["plain", "paper"])
def test_no_ctypes_reachable_from_the_program(sandbox, namespace):
    """The worker's ctypes wrappers, the ctypes modules, what a preloaded module imported from
    ctypes (sympy.external.gmpy: c_long, sizeof) and a new import are all out of reach."""
    result = sandbox.run(solution("""
        import sys
        def is_ctypes(value):
            owner = getattr(value, "__self__", None) if type(value) is type(len) else None
            return type(value).__module__.partition(".")[0] in ("ctypes", "_ctypes") or any(
                isinstance(v, type(sys)) and v.__name__.partition(".")[0] in ("ctypes", "_ctypes")
                for v in (value, owner))
        worker = sys.modules["__main__"]
        found = [name for name in sys.modules if name.partition(".")[0] in ("ctypes", "_ctypes")]
        found += [name for name, value in vars(worker).items() if is_ctypes(value)]
        found += [f"{name}.{key}" for name, module in list(sys.modules.items())
                  for key, value in list(getattr(module, "__dict__", {}).items()) if is_ctypes(value)]
        if worker.KERNEL is not None:
            found.append("KERNEL")
        for name in ("ctypes", "_ctypes", "ctypes.util"):
            try:
                __import__(name)
                found.append("import " + name)
            except BaseException as exc:
                if "blocked: import" not in str(exc):
                    found.append(f"import {name}: {exc!r}")
        return "nothing" if not found else ", ".join(found)"""), namespace=namespace)
    assert (result.status, result.answer) == ("ok", "nothing"), result


def test_program_reads_only_what_python_needs(sandbox, host, data_dir_or_none):
    """No training data (which would let a program look its question up and return the gold), no
    other process's /proc (command lines with --gold), no run directories or Ray session files
    (a world-readable directory in /tmp stands for them), not even a listing of /tmp."""
    needs(sandbox, "landlock")
    targets = [str(host.canary), f"/proc/{os.getpid()}/cmdline", f"/proc/{os.getpid()}/environ",
               "/proc/1/status", tempfile.gettempdir(), str(Path(__file__).resolve())]
    if data_dir_or_none is not None:
        targets += [str(next(data_dir_or_none.rglob("*.json")))]
    result = sandbox.run(solution(f"""
        import os
        readable = []
        for path in {targets!r}:
            try:
                os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1)
                readable.append(path)
            except OSError:
                pass
        return "none" if not readable else ", ".join(readable)"""))
    assert (result.status, result.answer) == ("ok", "none"), result
    # The interpreter's own modules stay importable where `nobody` may read them at all.
    if readable_by_others(os.__file__):
        result = sandbox.run(solution("import textwrap, json\nreturn json.dumps(textwrap.wrap('a b'))"))
        assert (result.status, result.answer) == ("ok", '["a b"]'), result


@pytest.fixture
def data_dir_or_none():
    from tests.conftest import DATA_DIR
    return DATA_DIR if (DATA_DIR / "reft" / "data").is_dir() else None


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_close_and_timeouts_leave_no_process_of_the_sandbox_uid():
    """Programs in flight when the pool closes, and programs over their time, are gone afterwards:
    no process of the sandbox uid is left (seccomp refuses prctl, so none can clear its
    parent-death signal, and close() kills each worker's whole session)."""
    pool = ProgramSandbox(num_workers=2, limits=SandboxLimits(timeout_s=30))
    needs(pool, "nobody")
    before = nobody_pids()
    sleeper = solution("""
        import time
        try:
            import ctypes                          # would clear its parent-death signal
            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)
        except BaseException:
            pass
        time.sleep(10**6)""")
    results = []
    runner = threading.Thread(target=lambda: results.extend(pool.run_many([sleeper, sleeper])))
    runner.start()
    try:
        assert wait_for(lambda: len(nobody_pids() - before) == 2), "the programs did not start"
    finally:
        pool.close()
    runner.join(10)
    assert [r.status for r in results] == ["killed", "killed"], results
    assert wait_for(lambda: not nobody_pids() - before), f"left alive: {nobody_pids() - before}"
    with ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=0.5)) as short:
        assert short.run(sleeper).status == "timeout"
        assert not nobody_pids() - before
    assert not nobody_pids() - before


def filesystem_free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_writes_are_capped_and_nothing_is_left_on_disk():
    """fallocate is refused, the private tmpfs fills up at its size, a deep directory chain
    costs nothing to clean up, and afterwards the host has its free space and an empty root."""
    limits = SandboxLimits(timeout_s=5, scratch_mb=4)
    with ProgramSandbox(num_workers=1, limits=limits) as pool:
        needs(pool, "private_scratch")
        free_before = filesystem_free_bytes(pool._tmp_root)
        fallocate = pool.run(solution("""
            import os
            f = open("big", "wb")
            os.posix_fallocate(f.fileno(), 0, 1 << 32)
            return os.stat("big").st_blocks"""))
        assert fallocate.status == "error" and "Operation not permitted" in fallocate.detail, fallocate
        fill = pool.run(solution("""
            n = 0
            try:
                while True:
                    with open(f"f{n}", "wb") as f:
                        f.write(b"x" * 60000)
                    n += 1
            except OSError as exc:
                return f"{n * 60000 // 2**20} MiB: {exc.strerror}" """))
        assert fill.status == "ok" and fill.answer.endswith("No space left on device"), fill
        assert int(fill.answer.split()[0]) <= limits.scratch_mb, fill
        deep = pool.run(solution("""
            import os
            path = "d"
            for depth in range(1100):
                os.mkdir(path)
                path += "/d"
            return depth + 1"""))
        assert (deep.status, deep.answer) == ("ok", "1100"), deep
        assert os.listdir(pool._tmp_root) == []
        assert filesystem_free_bytes(pool._tmp_root) > free_before - (16 << 20)
        assert_scores_good_program(pool)


def deep_chain(root: Path, depth: int, link_to: Path) -> None:
    """`depth` nested directories beneath `root`, each with a file and a symlink to `link_to`;
    the deepest one unreadable."""
    root.mkdir(exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.symlink(link_to, "out", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.fchmod(fd, 0)
    os.close(fd)


def test_remove_tree_is_depth_safe_and_never_raises(tmp_path):
    worker = load_worker_module()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("kept")
    deep_chain(tmp_path / "tree", 1100, keep)
    os.mkdir(tmp_path / "tree" / "empty")
    worker.remove_tree(str(tmp_path / "tree"))
    assert list(tmp_path.iterdir()) == [keep]
    assert (keep / "file").read_text() == "kept"          # the symlinks were not followed
    worker.remove_tree(str(tmp_path / "missing"))          # nothing there: no error either


def test_close_removes_a_deep_leftover_in_its_root(tmp_path):
    pool = ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=TIMEOUT_S))
    root = Path(pool._tmp_root)
    deep_chain(root / "run-left", 1100, tmp_path)
    pool.close()
    assert not root.exists()


# ------------------------------------------------------------------------------ the pool
def test_run_many_mixed_programs_in_order(sandbox):
    programs, expected = [], []
    for i in range(200):
        kind = i % 5
        if kind == 0:
            programs.append(solution(f"return {i} * 2"))
            expected.append(("ok", str(i * 2)))
        elif kind == 1:
            programs.append(solution(f"return {i} / 4"))
            expected.append(("ok", str(i / 4)))
        elif kind == 2:
            programs.append(solution(f"x = {i}"))
            expected.append(("no_answer", None))
        elif kind == 3:
            programs.append(solution(f"return {i} / 0"))
            expected.append(("error", None))
        else:
            programs.append(solution(f"import os\nos.system('true')\nreturn {i}"))
            expected.append(("error", None))
    programs[50] = programs[150] = solution("while True:\n    pass")
    expected[50] = expected[150] = ("timeout", None)

    results = sandbox.run_many(programs)
    assert [(r.status, r.answer) for r in results] == expected


def test_run_and_run_many_from_several_threads(sandbox):
    outcomes = {}

    def client(k: int) -> None:
        outcomes[k] = [r.answer for r in sandbox.run_many([solution(f"return {k} + {i}") for i in range(20)])]
        outcomes[k].append(sandbox.run(solution(f"return {k}")).answer)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == {k: [str(k + i) for i in range(20)] + [str(k)] for k in range(4)}


def test_timeout_override(sandbox):
    start = time.monotonic()
    result = sandbox.run(solution("while True:\n    pass"), timeout_s=0.5)
    assert result.status == "timeout" and time.monotonic() - start < 0.5 + MARGIN_S


def wait_until_dead(pid: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":   # dead, not yet reaped
                return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_worker_killed_from_outside_is_replaced(sandbox):
    victim = sandbox.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until_dead(victim)
    for _ in range(4):    # enough to go through both workers
        assert_scores_good_program(sandbox)
    assert victim not in sandbox.worker_pids and len(sandbox.worker_pids) == 2


def test_worker_dying_mid_program_costs_only_that_program():
    with ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=TIMEOUT_S)) as pool:
        victim = pool.worker_pids[0]
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        result = pool.run(solution("import time\ntime.sleep(1.5)\nreturn 1"))
        assert result.status == "killed" and "died" in result.detail, result
        assert_scores_good_program(pool)


def test_hung_worker_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(sandbox_module, "_REPLY_MARGIN_S", 0.5)
    with ProgramSandbox(num_workers=1, limits=SandboxLimits(timeout_s=0.5)) as pool:
        victim = pool.worker_pids[0]
        threading.Timer(0.1, os.kill, (victim, signal.SIGSTOP)).start()
        start = time.monotonic()
        result = pool.run(solution("import time\ntime.sleep(0.3)\nreturn 1"))
        assert result.status == "timeout" and time.monotonic() - start < 0.5 + 0.5 + MARGIN_S
        assert_scores_good_program(pool)
        assert victim not in pool.worker_pids


def test_close_is_idempotent_and_cleans_up():
    pool = ProgramSandbox(num_workers=2, limits=SandboxLimits(timeout_s=TIMEOUT_S))
    pids, tmp_root = pool.worker_pids, pool._tmp_root
    assert_scores_good_program(pool)
    pool.close()
    pool.close()
    assert not Path(tmp_root).exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError):
        pool.run(GOOD_PROGRAM)


# ------------------------------------------------------------------------------ the kernel layers
def load_worker_module():
    spec = importlib.util.spec_from_file_location("sandbox_worker", WORKER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# System calls a program must never make, whatever route it finds to make them (a ctypes handle, a
# memory bug): (name, x86_64 number, aarch64 number, arguments for the probe on x86_64).
DANGEROUS_SYSCALLS = [
    ("fork", 57, None, ()), ("clone", 56, 220, (17, 0, 0, 0, 0)), ("execve", 59, 221, (0, 0, 0)),
    ("socket", 41, 198, (2, 1, 0)), ("kill", 62, 129, ("ppid", 0)),
    ("shmget", 29, 194, (0, 64 << 20, 0o1600)), ("msgget", 68, 186, (0, 0o1600)),
    ("semget", 64, 190, (0, 4, 0o1600)), ("mq_open", 240, 180, (0, 0o100, 0o600, 0)),
    ("fallocate", 285, 47, (1, 1, 0, 1 << 30)),                     # FALLOC_FL_KEEP_SIZE, on fd 1
    ("prctl", 157, 167, (1, 0, 0, 0, 0)),                           # clear the parent-death signal
    ("setsid", 112, 157, ()), ("setpgid", 109, 154, (0, 0)),
    ("setpriority", 141, 140, (0, 1, 19)), ("ptrace", 101, 117, (16, 1, 0, 0)),   # attach to init
    ("process_vm_readv", 310, 270, (1, 0, 0, 0, 0, 0)), ("kexec_load", 246, 104, (0, 0, 0, 0)),
    ("mount", 165, 40, (0, 0, 0, 0, 0)), ("umount2", 166, 39, (0, 0)), ("unshare", 272, 97, (0x20000,)),
    ("bpf", 321, 280, (0, 0, 0)), ("perf_event_open", 298, 241, (0, 0, -1, -1, 0)),
    ("userfaultfd", 323, 282, (0,)), ("io_uring_setup", 425, 425, (1, 0)),
    ("keyctl", 250, 219, (0, 0)), ("memfd_create", 319, 279, (0, 0)),
    ("fchmodat", 268, 53, (-100, 0, 0o777)), ("symlinkat", 266, 36, (0, -100, 0)),
]

LAYER_PROBE = r"""
import ctypes, errno, importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("w", sys.argv[1])
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
workdir, canary, pwned, tmp_root = sys.argv[2:6]
syscalls = json.loads(sys.argv[6])
libc = ctypes.CDLL(None, use_errno=True)      # the probe's own handle: it survives the layers
libc.syscall.restype = ctypes.c_long
w.KERNEL = w.load_kernel_calls()
caps = w.probe_capabilities(tmp_root)
ppid = os.getppid()
w.confine(workdir, 2.0, {"memory_mb": 1024, "output_bytes": 1 << 16, "max_open_files": 64}, caps, ppid)
attempts = {
    "fork": os.fork,
    "socket": socket.socket,
    "kill": lambda: os.kill(ppid, 0),
    "overwrite": lambda: open(canary, "w"),
    "remove": lambda: os.remove(canary),
    "create": lambda: open(pwned, "w"),
    "read": lambda: open(canary).read(),
    "host-cmdline": lambda: open(f"/proc/{ppid}/cmdline").read(),
    "inside": lambda: open(os.path.join(workdir, "fine.txt"), "w"),
    "stdlib": lambda: open(os.__file__).read(),
}
outcome = {}
for name, attempt in attempts.items():
    try:
        attempt()
        outcome[name] = "allowed"
    except OSError:
        outcome[name] = "refused"
raw = {}
for name, nr, args in syscalls:
    args = [ppid if a == "ppid" else a for a in args]
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    raw[name] = "refused" if result == -1 and ctypes.get_errno() == errno.EPERM else f"returned {result}"
print(json.dumps({"caps": caps, "outcome": outcome, "raw": raw}))
"""


def readable_by_others(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) may read `path`: o+r, every parent o+x."""
    path = Path(path).resolve()
    return bool(path.stat().st_mode & 0o004) and all(p.stat().st_mode & 0o001 for p in path.parents)


def sysv_ipc_of(uid: int) -> list[str]:
    """The System V shared-memory segments, message queues and semaphores owned by `uid`."""
    found = []
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        uid_column = lines[0].split().index("uid")
        found += [f"{kind}: {line}" for line in lines[1:] if int(line.split()[uid_column]) == uid]
    return found


def test_kernel_layers_hold_without_the_audit_hook(host):
    """seccomp and Landlock on their own (no audit hook), against a process that holds a ctypes
    handle: what a program that reached one, or escaped the Python layer through a CPython memory
    bug, would still face. Every dangerous raw system call is refused, and the host is left with
    no IPC object of the sandbox uid."""
    if os.uname().machine != "x86_64":
        pytest.skip("the probe's raw system call numbers are x86_64's")
    workdir = tempfile.mkdtemp(prefix="reft-layers-")
    os.chmod(workdir, 0o777)
    tmp_root = tempfile.mkdtemp(prefix="reft-layers-root-")
    syscalls = [(name, nr, args) for name, nr, _, args in DANGEROUS_SYSCALLS]
    ipc_before = sysv_ipc_of(65534)
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", LAYER_PROBE, str(WORKER_SCRIPT), workdir,
                               str(host.canary), str(host.pwned), tmp_root, json.dumps(syscalls)],
                              capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(workdir)
        shutil.rmtree(tmp_root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    caps, outcome, raw = report["caps"], report["outcome"], report["raw"]
    assert outcome["inside"] == "allowed"
    if not caps["seccomp"]:
        pytest.skip(f"seccomp unavailable: {caps['problems']}")
    assert outcome["fork"] == outcome["socket"] == outcome["kill"] == "refused"
    assert raw == {name: "refused" for name, _, _ in syscalls}
    if caps["landlock_abi"]:
        assert outcome["overwrite"] == outcome["remove"] == outcome["create"] == "refused"
        assert outcome["read"] == outcome["host-cmdline"] == "refused"
        assert outcome["stdlib"] == ("allowed" if readable_by_others(os.__file__) else "refused")
    assert host.canary.read_text() == CANARY_TEXT and not host.pwned.exists()
    assert sysv_ipc_of(65534) == ipc_before


def run_bpf(program: bytes, arch: int, nr: int, arg1: int = 0) -> int:
    """A tiny interpreter for the instructions our seccomp filters use."""
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = {0: nr, 4: arch, 24: arg1}[k]
            pc += 1
        elif code in (0x15, 0x35):
            taken = acc == k if code == 0x15 else acc >= k
            pc += 1 + (jt if taken else jf)
        else:
            assert code == 0x06
            return k


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_decisions(machine):
    worker = load_worker_module()
    arch, numbers = worker.SYSCALL_TABLES[machine]
    bpf = worker.seccomp_filter(machine)
    eperm = worker.SECCOMP_RET_ERRNO | 1
    column = 1 if machine == "x86_64" else 2
    for case in DANGEROUS_SYSCALLS:
        if case[column] is not None:
            assert run_bpf(bpf, arch, case[column]) == eperm, case[0]
    for name in worker.ALLOWED_SYSCALLS:
        if name in numbers:
            assert run_bpf(bpf, arch, numbers[name]) == worker.SECCOMP_RET_ALLOW, name
    assert {"read", "write", "mmap", "exit_group", "openat"} <= set(numbers)
    assert run_bpf(bpf, arch, numbers["ioctl"], 0x5401) == worker.SECCOMP_RET_ALLOW   # TCGETS
    assert run_bpf(bpf, arch, numbers["ioctl"], 0x5412) == eperm                      # TIOCSTI
    assert run_bpf(bpf, arch, 999) == eperm                                           # unknown: denied
    assert run_bpf(bpf, 0x40000003, 1) == worker.SECCOMP_RET_KILL_PROCESS    # i386 ABI
    if machine == "x86_64":
        assert run_bpf(bpf, arch, 0x40000000 | 1) == worker.SECCOMP_RET_KILL_PROCESS   # x32 ABI
