"""Sandbox worker: a small fork server that runs untrusted model-written programs.

Started by ``rewards/sandbox.py`` as ``python -I _sandbox_worker.py CONFIG_JSON`` with a scrubbed
environment. Standard library only and single-threaded. The worker never runs user code itself:
for every program it forks a fresh child, confines the child and runs the program there, so limits
are per program and nothing (state, files, processes) survives from one program to the next.

Protocol, over the worker's stdin/stdout pipes: every message is a 4-byte big-endian length
followed by that many bytes of UTF-8 JSON.
    worker -> host, once at startup: {"pid", "seccomp", "landlock_abi", "drops_privileges", "problems"}
    host -> worker, per program:     {"program": str, "timeout_s": float}
    worker -> host, per program:     {"status", "answer", "detail", "seconds"}

Protection layers, applied in the child in this order; each holds even if a later one is bypassed:
 1. a process of its own, in a session of its own, SIGKILLed (the whole group) when it is done or
    over time, and SIGKILLed by the kernel if the worker dies (parent-death signal);
 2. a private temp dir as cwd, stdin from /dev/null, stdout/stderr into a file in the temp dir;
 3. rlimits: CPU time, address space, file size (caps the output), open files, no core dumps,
    no new processes;
 4. privileges dropped to nobody when the worker runs as root;
 5. Landlock (Linux >= 5.13): file-system changes only beneath the temp dir, no TCP, no signals
    or abstract unix sockets to processes outside the sandbox;
 6. seccomp-BPF: no fork/exec/threads, sockets, signals, ptrace, namespaces, mounts, ... (EPERM);
 7. a Python audit hook that refuses the same operations, plus file writes outside the temp dir,
    with a clear "blocked: <event>" error.
"""
import ctypes
import errno
import json
import math
import os
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import types

# Loaded before any fork, so that a program's `import` of them is a dictionary lookup: fast, and
# possible at all when `nobody` cannot read the interpreter's files (e.g. a Python under /root).
# First what a word-problem program may use; then the modules whose use the audit hook refuses,
# so that a program trying them gets a clear "blocked: ..." and not an ImportError.
PRELOADED_MODULES = (
    "bisect", "calendar", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "heapq", "itertools", "math", "numbers", "operator",
    "random", "re", "statistics", "string", "typing",
    "encodings.idna", "socket", "subprocess", "threading",   # idna: socket name lookups
)
for _module in PRELOADED_MODULES:
    __import__(_module)

NOBODY = 65534                  # uid and gid of `nobody`
ANSWER_CHARS = 256              # caps of the texts a program can put in its result
DETAIL_CHARS = 300
MAX_REQUEST_BYTES = 64 << 20    # a larger message from the host is a protocol error
MAX_RESULT_BYTES = 1 << 16      # how much the worker reads from a child's result pipe
RESULT_FD = 3                   # the child's result pipe, after its other descriptors are closed
OUTPUT_FILE = "output.txt"      # the program's stdout and stderr, inside its temp dir

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    args = (ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    _check(_libc.prctl(option, *args), f"prctl({option})")


PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38


# --------------------------------------------------------------------------- seccomp-BPF
# A hand-written classic-BPF filter rather than `pyseccomp`: the worker stays stdlib-only (no
# dependency that has not been released since 2021, no libseccomp to dlopen), and the whole policy
# is the ~40 lines below, with explicit syscall tables for the two architectures we run on.
# Denied calls fail with EPERM, which Python turns into a clean PermissionError. A call made through
# another ABI (i386 `int 0x80` on x86_64, or x32) would not match these numbers, so it kills.
DENIED_SYSCALLS = (
    # new processes and threads (the program needs neither), running other programs
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    # networking
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # signals to other processes, and reaching into them
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev",
    # namespaces, mounts and rarely-needed kernel attack surface
    "unshare", "setns", "mount", "umount2", "chroot", "pivot_root", "personality",
    "keyctl", "add_key", "request_key", "bpf", "userfaultfd", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "mknod", "mknodat",
)
# machine -> (AUDIT_ARCH_* value, syscall numbers). aarch64 has no fork, vfork or mknod.
SYSCALL_TABLES = {
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
        "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43,
        "accept4": 288, "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "chroot": 161, "pivot_root": 155,
        "personality": 135, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "userfaultfd": 323, "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "mknod": 133, "mknodat": 259,
    }),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "socket": 198,
        "socketpair": 199, "connect": 203, "bind": 200, "listen": 201, "accept": 202,
        "accept4": 242, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "chroot": 51, "pivot_root": 41,
        "personality": 92, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "userfaultfd": 282, "perf_event_open": 241, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "mknodat": 33,
    }),
}
BPF_LD_W_ABS = 0x20                 # A = 32-bit word at offset k of struct seccomp_data
BPF_JEQ_K, BPF_JGE_K = 0x15, 0x35   # if A == k / A >= k: skip jt instructions, else skip jf
BPF_RET_K = 0x06
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
X32_SYSCALL_BIT = 0x40000000


def seccomp_filter(machine: str) -> bytes:
    """The BPF program (an array of struct sock_filter) for `machine`."""
    arch, numbers = SYSCALL_TABLES[machine]
    denied = sorted(numbers[name] for name in DENIED_SYSCALLS if name in numbers)
    kill = (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)
    program = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 1, 0, arch),                   # our architecture: skip the kill
        kill,
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":                        # x32 calls: same arch value, bit 30 set
        program += [(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), kill]
    for i, nr in enumerate(denied):                # a match jumps past the other tests and ALLOW
        program.append((BPF_JEQ_K, len(denied) - i, 0, nr))
    program += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
                (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


MACHINE = os.uname().machine
SECCOMP_FILTER = seccomp_filter(MACHINE) if MACHINE in SYSCALL_TABLES else b""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install_seccomp(bpf: bytes) -> None:
    """Irreversibly restrict this process's system calls. Needs PR_SET_NO_NEW_PRIVS set."""
    fprog = _SockFprog(len(bpf) // 8, bpf)
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# --------------------------------------------------------------------------- Landlock
# Unprivileged file-system sandboxing (Linux >= 5.13). The rights below are "handled", i.e. denied
# unless a rule allows them; our one rule allows them beneath the program's temp dir. Reading is not
# handled: a program may read what `nobody` may read (e.g. the stdlib).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS_EXECUTE = 1 << 0
LANDLOCK_FS_CHANGES = (          # (ABI version that introduced it, access right)
    (1, 1 << 1),                 # WRITE_FILE
    (1, 1 << 4),                 # REMOVE_DIR
    (1, 1 << 5),                 # REMOVE_FILE
    (1, 0x7F << 6),              # MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
    (2, 1 << 13),                # REFER: link or rename across directories
    (3, 1 << 14),                # TRUNCATE
)
LANDLOCK_NET_TCP = 0b11          # ABI 4: BIND_TCP, CONNECT_TCP (no rule allows any port)
LANDLOCK_SCOPED = 0b11           # ABI 6: ABSTRACT_UNIX_SOCKET, SIGNAL (to outside the sandbox)


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    version = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(version, 0)


def install_landlock(workdir: str, abi: int) -> None:
    """Irreversibly confine file-system changes to `workdir`. Needs PR_SET_NO_NEW_PRIVS set."""
    changes = sum(right for since, right in LANDLOCK_FS_CHANGES if abi >= since)
    attr = _LandlockRulesetAttr(changes | LANDLOCK_ACCESS_FS_EXECUTE,
                                LANDLOCK_NET_TCP if abi >= 4 else 0,
                                LANDLOCK_SCOPED if abi >= 6 else 0)
    attr_size = 24 if abi >= 6 else 16 if abi >= 4 else 8   # the fields this kernel knows
    ruleset = _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                                   ctypes.c_size_t(attr_size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        beneath = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _LandlockPathBeneathAttr(changes, beneath)
            _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                 ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                 ctypes.c_uint32(0)), "landlock_add_rule")
        finally:
            os.close(beneath)
        _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                             ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# --------------------------------------------------------------------------- audit hook
class SandboxViolation(BaseException):
    """Raised by the audit hook. Not an Exception, so `except Exception:` in a program cannot
    swallow it and carry on as if the refused operation had merely failed."""


# Refused whatever their arguments (https://docs.python.org/3/library/audit_events.html).
BLOCKED_EVENTS = frozenset({
    "os.system", "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "_thread.start_new_thread",
    "os.chdir",                      # the write check below relies on the cwd staying the temp dir
    "os.link", "os.symlink",         # a link in the temp dir could lead out of it
    "resource.setrlimit", "resource.prlimit",
    # Ways to disable this hook: hand-made bytecode can corrupt memory, the hook function is
    # reachable only through the gc, and a subinterpreter would run without it.
    "code.__new__", "marshal.load", "marshal.loads",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New",
})
BLOCKED_EVENT_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn",
                          "os.fork", "os.kill", "os.startfile")   # os.forkpty, os.killpg too
# Test-only extension modules that can write anywhere in memory.
BLOCKED_IMPORTS = frozenset({"_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                             "_ctypes_test", "_xxsubinterpreters", "_xxtestfuzz"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Events that change the file system: (event, positions of path arguments, positions of dir_fd
# arguments). Tuples, not a dict: the hook must not depend on anything a program could mutate.
FS_EVENTS = (
    ("os.chflags", (0,), ()), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)),
    ("os.mkdir", (0,), (2,)), ("os.remove", (0,), (1,)), ("os.removexattr", (0,), ()),
    ("os.rename", (0, 1), (2, 3)), ("os.rmdir", (0,), (1,)), ("os.setxattr", (0,), ()),
    ("os.truncate", (0,), ()), ("os.utime", (0,), (3,)), ("shutil.rmtree", (0,), (1,)),
)


def install_audit_hook(workdir: str) -> None:
    """Refuse dangerous operations at the Python level, for good (a hook cannot be removed).

    The hook and its helper use only their own parameters (bound as defaults right here, all
    immutable) and methods of built-in types, so a program cannot change what they decide by
    patching modules, builtins or this module's globals.
    """
    def is_inside(path, root=workdir + "/", type=type, str=str, bytes=bytes):
        """Whether `path` names something beneath the temp dir. Plain string work is exact here:
        the temp dir holds no symlinks (the hook refuses to make any) and the cwd cannot change."""
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        elif type(path) is not str:
            return False     # a file descriptor, or a path-like object whose __fspath__ could lie
        if not path.startswith("/"):
            path = root + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return ("/" + "/".join(parts) + "/").startswith(root)

    def hook(event, args, blocked=BLOCKED_EVENTS, prefixes=BLOCKED_EVENT_PREFIXES,
             blocked_imports=BLOCKED_IMPORTS, fs_events=FS_EVENTS,
             fs_event_names=frozenset(name for name, _, _ in FS_EVENTS), write_flags=WRITE_FLAGS,
             is_inside=is_inside, function=types.FunctionType, type=type, int=int, str=str,
             Violation=SandboxViolation):
        if event in blocked or event.startswith(prefixes):
            raise Violation("blocked: " + event)
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if type(flags) is int and flags & write_flags and type(path) is not int:
                if mode is None:     # os.open: its dir_fd argument is not part of the event
                    raise Violation("blocked: os.open for writing")
                if not is_inside(path):
                    raise Violation("blocked: open for writing outside the sandbox directory")
        elif event in fs_event_names:
            for name, paths, dir_fds in fs_events:
                if name != event:
                    continue
                for i in dir_fds:
                    if type(args[i]) is int and args[i] != -1:
                        raise Violation("blocked: " + event + " relative to a directory descriptor")
                for i in paths:
                    if not is_inside(args[i]):
                        raise Violation("blocked: " + event + " outside the sandbox directory")
        elif event == "import":
            name = args[0]
            if type(name) is not str or name.partition(".")[0] in blocked_imports:
                raise Violation("blocked: import")
        elif event in ("object.__setattr__", "object.__delattr__") and type(args[0]) is function:
            raise Violation("blocked: " + event + " on a function")   # e.g. __code__, __defaults__

    sys.addaudithook(hook)


# --------------------------------------------------------------------------- the child
def confine(workdir: str, timeout_s: float, config: dict, caps: dict, worker_pid: int) -> None:
    """Apply layers 3-6 to this process (the child): rlimits, nobody, Landlock, seccomp."""
    cpu_s = math.ceil(timeout_s)
    for limit, value in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),   # SIGXCPU, then SIGKILL
                         (resource.RLIMIT_AS, (config["memory_mb"] << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (config["output_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (config["max_open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_NPROC, (0, 0))):
        resource.setrlimit(limit, value)
    if caps["drops_privileges"]:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    # After the uid change, which resets it: die with the worker, never outlive it.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:
        os._exit(1)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if caps["landlock_abi"]:
        install_landlock(workdir, caps["landlock_abi"])
    if caps["seccomp"]:
        install_seccomp(SECCOMP_FILTER)


def redirect_stdio(result_fd: int) -> None:
    """Keep only the result pipe (as RESULT_FD); stdin from /dev/null, stdout/stderr to a file."""
    os.dup2(result_fd, RESULT_FD)
    os.closerange(RESULT_FD + 1, os.sysconf("SC_OPEN_MAX"))   # close_range(2) on Linux
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    output = os.open(OUTPUT_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    # Over RLIMIT_FSIZE a write fails with EFBIG (an OSError in the program) instead of killing it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def describe(exc: BaseException) -> str:
    if isinstance(exc, SandboxViolation):
        return str(exc)
    try:
        message = str(exc)
    except BaseException:                       # a program's exception with a broken __str__
        message = "<unprintable>"
    name = type(exc).__name__
    return (f"{name}: {message}" if message else name)[:DETAIL_CHARS]


def format_answer(value) -> str:
    """int/float/bool -> str(value); str -> itself; else str(float(value)) if that works, else repr."""
    if isinstance(value, (str, int, float)):    # bool is an int: "True"/"False"
        text = value if isinstance(value, str) else str(value)
    else:
        try:
            text = str(float(value))
        except Exception:
            text = repr(value)
    return text[:ANSWER_CHARS]


def execute(program: str) -> dict:
    """Run the program's solution() in fresh globals; the reply for the worker."""
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(program, "<program>", "exec"), namespace)
        solution = namespace.get("solution")
        if not callable(solution):
            return {"status": "error", "detail": "the program defines no solution()"}
        value = solution()
        if value is None:
            return {"status": "no_answer"}
        return {"status": "ok", "answer": format_answer(value)}
    except BaseException as exc:                # SystemExit, RecursionError, MemoryError, ...
        return {"status": "error", "detail": describe(exc)}


def run_child(program: str, workdir: str, result_fd: int, timeout_s: float, config: dict,
              caps: dict, worker_pid: int) -> None:
    """The forked child: confine itself, run the program, write one JSON reply. Never returns."""
    try:
        os.setsid()
        os.chdir(workdir)
        redirect_stdio(result_fd)
        try:
            confine(workdir, timeout_s, config, caps, worker_pid)
        except Exception as exc:                # fail closed: never run a program half-confined
            reply = {"status": "error", "detail": f"sandbox setup failed: {describe(exc)}"}
        else:
            # Imports compile from source instead of unmarshalling .pyc files (the hook refuses
            # marshal, which can build arbitrary bytecode).
            sys.pycache_prefix = os.path.join(workdir, "no-pycache")
            sys.dont_write_bytecode = True
            install_audit_hook(workdir)
            reply = execute(program)
        os.write(RESULT_FD, json.dumps(reply).encode())
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- the worker
def read_result(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Read the child's reply until EOF or the deadline: (data, timed_out). Reads at most
    MAX_RESULT_BYTES (+ one chunk); more than that is a malformed reply anyway."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while len(data) <= MAX_RESULT_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, True
        if poller.poll(math.ceil(remaining * 1000)):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    return data, False


def kill_process_group(pid: int) -> None:
    # The child leads its own group (setsid); if it was killed before getting that far, kill it alone.
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_tree(path: str) -> None:
    """Delete a program's temp dir, whatever it left there. shutil.rmtree never follows symlinks;
    directories the program made unreadable are opened up first (real directories only: lstat)."""
    os.chmod(path, 0o700)
    for root, dirs, _files in os.walk(path):     # top-down: a directory is fixed before it is entered
        for name in dirs:
            child = os.path.join(root, name)
            if stat.S_ISDIR(os.lstat(child).st_mode):
                os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def child_reply(data: bytes) -> dict:
    """Validate what a child wrote: a program can write to its result pipe too."""
    try:
        reply = json.loads(data)
        status, answer, detail = reply["status"], reply.get("answer"), reply.get("detail", "")
    except (ValueError, TypeError, KeyError, AttributeError):
        status = answer = detail = None
    if not (status in ("ok", "no_answer", "error") and isinstance(detail, str)
            and (isinstance(answer, str) if status == "ok" else answer is None)):
        return {"status": "error", "answer": None, "detail": "malformed result from the program"}
    if status == "ok":
        answer = answer[:ANSWER_CHARS]
    return {"status": status, "answer": answer, "detail": detail[:DETAIL_CHARS]}


def run_program(program: str, timeout_s: float, config: dict, caps: dict) -> dict:
    """Fork a child for `program`, wait for its reply within `timeout_s`, clean up after it."""
    workdir = tempfile.mkdtemp(prefix="run-", dir=config["tmp_root"])
    try:
        if caps["drops_privileges"]:
            os.chown(workdir, NOBODY, NOBODY)
        read_fd, write_fd = os.pipe()
        worker_pid = os.getpid()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            run_child(program, workdir, write_fd, timeout_s, config, caps, worker_pid)
        os.close(write_fd)
        try:
            data, timed_out = read_result(read_fd, start + timeout_s)
            seconds = time.monotonic() - start
        finally:
            os.close(read_fd)
            kill_process_group(pid)          # also after a normal exit: nothing may linger
            _, wait_status, usage = os.wait4(pid, 0)
    finally:
        remove_tree(workdir)

    def reply(status: str, detail: str) -> dict:
        return {"status": status, "answer": None, "detail": detail, "seconds": seconds}

    if timed_out:
        return reply("timeout", f"over the {timeout_s:g} s wall-clock limit")
    if data:
        return {**child_reply(data), "seconds": seconds}
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        cpu_s = usage.ru_utime + usage.ru_stime
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= math.ceil(timeout_s)):
            return reply("timeout", f"over the {math.ceil(timeout_s)} s CPU limit")
        try:
            return reply("killed", signal.Signals(sig).name)
        except ValueError:
            return reply("killed", f"signal {sig}")
    return reply("killed", f"exited with status {os.waitstatus_to_exitcode(wait_status)} without a result")


def probe_capabilities() -> dict:
    """Which layers this machine supports. Seccomp is tried for real in a throwaway child."""
    problems = []
    seccomp = bool(SECCOMP_FILTER)
    if not seccomp:
        problems.append(f"seccomp: no system call table for {MACHINE}")
    else:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                message = "the filter let fork() through"
                try:
                    _prctl(PR_SET_NO_NEW_PRIVS, 1)
                    install_seccomp(SECCOMP_FILTER)
                    if os.fork() == 0:
                        os._exit(0)
                except PermissionError:
                    message = ""                 # installed, and fork() was refused
                except Exception as exc:
                    message = str(exc)
                os.write(write_fd, message.encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
        if message:
            seccomp = False
            problems.append(f"seccomp: {message}")
    abi = landlock_abi()
    if not abi:
        problems.append("landlock: not available in this kernel")
    drops_privileges = os.geteuid() == 0
    if not drops_privileges:
        problems.append("privilege drop: the worker is not root, programs run as the host's user")
    return {"pid": os.getpid(), "seccomp": seccomp, "landlock_abi": abi,
            "drops_privileges": drops_privileges, "problems": problems}


def read_exactly(fd: int, n: int) -> bytes | None:
    """n bytes from a blocking fd; None on EOF at a message boundary."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            if data:
                raise EOFError("the host closed the pipe in the middle of a message")
            return None
        data += chunk
    return data


def receive(fd: int) -> dict | None:
    header = read_exactly(fd, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {size} bytes")
    return json.loads(read_exactly(fd, size) or b"")


def send(fd: int, message: dict) -> None:
    body = json.dumps(message).encode()
    data = memoryview(struct.pack(">I", len(body)) + body)
    while data:
        data = data[os.write(fd, data):]


def main() -> None:
    config = json.loads(sys.argv[1])    # memory_mb, output_bytes, max_open_files, tmp_root
    # The protocol moves to private descriptors; fds 0 and 1 become /dev/null, so that nothing
    # printed by accident can corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    caps = probe_capabilities()
    send(replies, caps)
    while (request := receive(requests)) is not None:   # EOF: the host is gone
        try:
            reply = run_program(request["program"], float(request["timeout_s"]), config, caps)
        except Exception as exc:
            reply = {"status": "error", "answer": None, "seconds": 0.0,
                     "detail": f"sandbox worker error: {describe(exc)}"[:DETAIL_CHARS]}
        send(replies, reply)


if __name__ == "__main__":
    main()
