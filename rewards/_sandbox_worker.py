"""Sandbox worker: a small fork server that runs untrusted model-written programs.

Started by ``rewards/sandbox.py`` as ``python -I _sandbox_worker.py CONFIG_JSON`` with a scrubbed
environment, in a session of its own. Standard library only and single-threaded. The worker never
runs user code itself: for every program it forks a fresh child, confines the child and runs the
program there, so limits are per program and nothing (state, files, processes) survives from one
program to the next.

Protocol, over the worker's stdin/stdout pipes: every message is a 4-byte big-endian length
followed by that many bytes of UTF-8 JSON.
    worker -> host, once at startup: {"pid", "seccomp", "landlock_abi", "private_scratch",
                                      "drops_privileges", "problems"}
    host -> worker, per program:     {"program": str, "timeout_s": float, "namespace": str}
    worker -> host, per program:     {"status", "answer", "number", "detail", "seconds"}

How a program is run (``namespace``, see `execute`): "plain" runs it as a module and calls its
``solution()``; "paper" runs it as the paper's code does (src/python_engine.py::run), with
``math`` and ``sympy`` in its globals, and also reports ``float(value)`` ("number").

Protection layers, applied in the child in this order; each holds even if a later one is bypassed
(README, "The P-CoT sandbox", says what each stops):
 1. a process group of its own inside the worker's session: the worker SIGKILLs the group when the
    program is done or over time, the host kills the whole session when it closes the pool, and
    the kernel SIGKILLs the child if the worker dies (parent-death signal, which it cannot clear);
 2. private namespaces (root only): a mount namespace with a size- and inode-capped tmpfs as the
    program's only writable space, and an IPC namespace; both vanish with the process;
 3. stdin from /dev/null, stdout/stderr into a file in the private space;
 4. rlimits: CPU time, address space, file size, open files, no core dumps, no new processes;
 5. privileges dropped to nobody when the worker runs as root;
 6. Landlock: reads only the interpreter's library directories, changes only its private space,
    no TCP, no signals or abstract unix sockets to outside processes;
 7. seccomp-BPF: an allow-list of the system calls a pure-Python computation needs (EPERM else);
 8. no ctypes: every reference to the worker's ctypes objects is dropped, and ctypes is removed
    from sys.modules so that importing it again goes through the audit hook;
 9. a Python audit hook that refuses processes, sockets, ctypes, writes outside the private space,
    ... with a clear "blocked: <event>" error.
The kernel layers (2, 4-7) are the barrier; 8 and 9 give clear errors and shrink what a program
can reach, but CPython offers no complete in-process isolation (e.g. `_ctypes`'s types cannot be
unloaded once imported), which is why 7 allows only harmless system calls.
"""
import errno
import gc
import json
import math
import os
import resource
import select
import signal
import stat
import struct
import sys
import sysconfig
import tempfile
import time
import types

# Loaded before any fork, so that a program's `import` of them is a dictionary lookup: fast, and
# possible at all when `nobody` cannot read the interpreter's files (e.g. a Python under /root).
# First what a word-problem program may use (sympy: the paper's runner gives every program
# `math` and `sympy`; imported in a child it would cost ~0.3 s, and fails there anyway since
# the audit hook refuses the marshal its dependency mpmath needs); then the modules whose use
# the audit hook refuses, so that a program trying them gets a clear "blocked: ..." and not an
# ImportError.
PRELOADED_MODULES = (
    "bisect", "calendar", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "heapq", "itertools", "math", "numbers", "operator",
    "random", "re", "statistics", "string", "sympy", "typing",
    "encodings.idna", "socket", "subprocess", "threading",   # idna: socket name lookups
)
NAMESPACES = ("plain", "paper")   # how a program is run: see `execute`
CTYPES_PACKAGES = ("ctypes", "_ctypes")

NOBODY = 65534                  # uid and gid of `nobody`
ANSWER_CHARS = 256              # caps of the texts a program can put in its result
DETAIL_CHARS = 300
MAX_REQUEST_BYTES = 64 << 20    # a larger message from the host is a protocol error
MAX_RESULT_BYTES = 1 << 16      # how much the worker reads from a child's result pipe
RESULT_FD = 3                   # the child's result pipe, after its other descriptors are closed
OUTPUT_FILE = "output.txt"      # the program's stdout and stderr, inside its private space
SCRATCH_INODES = 2048           # files and directories a program may create in its tmpfs

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000

# The raw system calls the layers need (see load_kernel_calls). Set once in the worker; the child
# sets it back to None before the program runs, so that no ctypes object stays reachable.
KERNEL = None


# --------------------------------------------------------------------------- raw system calls
def load_kernel_calls() -> types.SimpleNamespace:
    """ctypes wrappers for prctl, unshare, mount and the Landlock/seccomp calls. Closures only:
    the one reference to them is the global KERNEL, which the child drops (forget_kernel_calls)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def check(result: int, what: str) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
        args = (ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
        check(libc.prctl(option, *args), f"prctl({option})")

    def syscall(name: str, nr: int, *args) -> int:
        return check(libc.syscall(ctypes.c_long(nr), *args), name)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    def install_seccomp(bpf: bytes) -> None:
        fprog = SockFprog(len(bpf) // 8, bpf)
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                    ("scoped", ctypes.c_uint64)]

    class PathBeneathAttr(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def landlock_abi() -> int:
        version = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                               ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
        return max(version, 0)

    def landlock_ruleset(fs: int, net: int, scoped: int, size: int) -> int:
        attr = RulesetAttr(fs, net, scoped)
        return syscall("landlock_create_ruleset", SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                       ctypes.c_size_t(size), ctypes.c_uint32(0))

    def landlock_allow(ruleset: int, path_fd: int, access: int) -> None:
        rule = PathBeneathAttr(access, path_fd)
        syscall("landlock_add_rule", SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))

    def landlock_restrict(ruleset: int) -> None:
        syscall("landlock_restrict_self", SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset),
                ctypes.c_uint32(0))

    def unshare(flags: int) -> None:
        check(libc.unshare(ctypes.c_int(flags)), "unshare")

    def mount(source: bytes, target: bytes, fstype, flags: int, data) -> None:
        check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), "mount")

    return types.SimpleNamespace(prctl=prctl, install_seccomp=install_seccomp,
                                 landlock_abi=landlock_abi, landlock_ruleset=landlock_ruleset,
                                 landlock_allow=landlock_allow, landlock_restrict=landlock_restrict,
                                 unshare=unshare, mount=mount)


def is_ctypes_object(value) -> bool:
    """A ctypes module, or a type, instance or function that comes from one."""
    def from_ctypes(name) -> bool:
        return isinstance(name, str) and name.partition(".")[0] in CTYPES_PACKAGES

    if isinstance(value, types.ModuleType):
        return from_ctypes(value.__name__)
    if from_ctypes(type(value).__module__):            # c_long (its type is _ctypes'), CDLL(...), c_int(3)
        return True
    if isinstance(value, types.BuiltinFunctionType):    # _ctypes.sizeof: its __self__ is the module
        owner = value.__self__
        return isinstance(owner, types.ModuleType) and from_ctypes(owner.__name__)
    if isinstance(value, (type, types.FunctionType)):   # defined in ctypes/*.py
        return from_ctypes(value.__dict__.get("__module__") if isinstance(value, type) else value.__module__)
    return False


def drop_ctypes_references() -> None:
    """Part of layer 8, once in the worker after the preloading: delete every module attribute
    outside ctypes itself that holds a ctypes object, so that no loaded module hands a program
    one. (sympy.external.gmpy does ``from ctypes import c_long, sizeof``, used at import only;
    from c_long a program could read and write any memory address.)"""
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if name.partition(".")[0] in CTYPES_PACKAGES or not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            if is_ctypes_object(value):
                del namespace[key]


def forget_kernel_calls() -> None:
    """Layer 8: drop the worker's ctypes wrappers and take ctypes out of sys.modules, so that the
    program finds no ctypes object through the worker (``sys.modules["__main__"]``) or sys.modules,
    and a new ``import ctypes`` raises the audit event that the hook refuses."""
    global KERNEL
    KERNEL = None
    for name in [name for name in sys.modules if name.partition(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]


# --------------------------------------------------------------------------- seccomp-BPF
# A hand-written classic-BPF filter rather than `pyseccomp`: the worker stays stdlib-only (no
# dependency that has not been released since 2021, no libseccomp to dlopen), and the whole policy
# is the allow-list below, with explicit syscall tables for the two architectures we run on.
# Every other call fails with EPERM, which Python turns into a clean PermissionError: new
# processes and threads, exec, sockets, signals, SysV IPC and POSIX message queues, fallocate,
# prctl (so the parent-death signal stays), setsid/setpgid, setpriority, chmod/chown, links,
# ptrace, process_vm_*, mount and namespaces, kexec, bpf, perf_event_open, userfaultfd, io_uring,
# keyctl, memfd... A call made through another ABI (i386 `int 0x80` on x86_64, or x32) kills.
ALLOWED_SYSCALLS = (
    # memory, and the signals the runtime handles itself
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    # descriptors it already has or opens (Landlock decides which paths)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "close_range",
    "fcntl", "dup", "dup2", "dup3", "pipe", "pipe2", "poll", "ppoll", "select", "pselect6",
    "fsync", "fdatasync", "ftruncate", "truncate",
    "open", "openat", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "getdents64", "getcwd", "readlink", "readlinkat",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    # facts about itself, clocks, randomness, the end
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "uname", "sysinfo", "getrlimit",
    "prlimit64", "getrusage", "times", "sched_getaffinity", "sched_yield", "getrandom",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "exit", "exit_group",
)
# ioctl only for these requests (isatty, close-on-exec, bytes readable): no terminal injection.
ALLOWED_IOCTLS = (0x5401, 0x5450, 0x5451, 0x541B)   # TCGETS, FIONCLEX, FIOCLEX, FIONREAD
# machine -> (AUDIT_ARCH_* value, syscall numbers). aarch64 lacks the legacy calls (open, stat, ...).
SYSCALL_TABLES = {
    "x86_64": (0xC000003E, {
        "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
        "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
        "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18,
        "readv": 19, "writev": 20, "access": 21, "pipe": 22, "select": 23, "sched_yield": 24,
        "mremap": 25, "madvise": 28, "dup": 32, "dup2": 33, "nanosleep": 35, "getpid": 39,
        "exit": 60, "uname": 63, "fcntl": 72, "fsync": 74, "fdatasync": 75, "truncate": 76,
        "ftruncate": 77, "getcwd": 79, "rename": 82, "mkdir": 83, "rmdir": 84, "unlink": 87,
        "readlink": 89, "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo": 99,
        "times": 100, "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108,
        "getppid": 110, "getpgrp": 111, "getgroups": 115, "getresuid": 118, "getresgid": 120,
        "getpgid": 121, "getsid": 124, "sigaltstack": 131, "statfs": 137, "fstatfs": 138,
        "gettid": 186, "time": 201, "futex": 202, "sched_getaffinity": 204, "getdents64": 217,
        "restart_syscall": 219, "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
        "exit_group": 231, "openat": 257, "mkdirat": 258, "newfstatat": 262, "unlinkat": 263,
        "renameat": 264, "readlinkat": 267, "faccessat": 269, "pselect6": 270, "ppoll": 271,
        "dup3": 292, "pipe2": 293, "prlimit64": 302, "renameat2": 316, "getrandom": 318,
        "statx": 332, "close_range": 436, "faccessat2": 439,
    }),
    "aarch64": (0xC00000B7, {
        "getcwd": 17, "dup": 23, "dup3": 24, "fcntl": 25, "ioctl": 29, "mkdirat": 34,
        "unlinkat": 35, "renameat": 38, "statfs": 43, "fstatfs": 44, "truncate": 45,
        "ftruncate": 46, "faccessat": 48, "openat": 56, "close": 57, "pipe2": 59,
        "getdents64": 61, "lseek": 62, "read": 63, "write": 64, "readv": 65, "writev": 66,
        "pread64": 67, "pwrite64": 68, "pselect6": 72, "ppoll": 73, "readlinkat": 78,
        "newfstatat": 79, "fstat": 80, "fsync": 82, "fdatasync": 83, "exit": 93, "exit_group": 94,
        "futex": 98, "nanosleep": 101, "clock_gettime": 113, "clock_getres": 114,
        "clock_nanosleep": 115, "sched_getaffinity": 123, "sched_yield": 124,
        "restart_syscall": 128, "sigaltstack": 132, "rt_sigaction": 134, "rt_sigprocmask": 135,
        "rt_sigreturn": 139, "getresuid": 148, "getresgid": 150, "times": 153, "getpgid": 155,
        "getsid": 156, "getgroups": 158, "uname": 160, "getrlimit": 163, "getrusage": 165,
        "gettimeofday": 169, "getpid": 172, "getppid": 173, "getuid": 174, "geteuid": 175,
        "getgid": 176, "getegid": 177, "gettid": 178, "sysinfo": 179, "brk": 214, "munmap": 215,
        "mremap": 216, "mmap": 222, "mprotect": 226, "madvise": 233, "prlimit64": 261,
        "renameat2": 276, "getrandom": 278, "statx": 291, "close_range": 436, "faccessat2": 439,
    }),
}
BPF_LD_W_ABS = 0x20                 # A = 32-bit word at offset k of struct seccomp_data
BPF_JEQ_K, BPF_JGE_K = 0x15, 0x35   # if A == k / A >= k: skip jt instructions, else skip jf
BPF_RET_K = 0x06
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4
SECCOMP_DATA_ARG1_LOW = 16 + 8      # args[1], low 32 bits (both machines are little-endian)
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
X32_SYSCALL_BIT = 0x40000000


def seccomp_filter(machine: str) -> bytes:
    """The BPF program (an array of struct sock_filter) for `machine`: the allow-list."""
    arch, numbers = SYSCALL_TABLES[machine]
    allowed = sorted(numbers[name] for name in ALLOWED_SYSCALLS if name in numbers)
    kill = (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)
    deny = (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)
    allow = (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    program = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 1, 0, arch),                   # our architecture: skip the kill
        kill,
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":                        # x32 calls: same arch value, bit 30 set
        program += [(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), kill]
    # Layout: [one test per allowed call] [ioctl test] deny allow [ioctl request tests] deny allow
    for i, nr in enumerate(allowed):               # a match jumps to `allow`
        program.append((BPF_JEQ_K, len(allowed) - i + 1, 0, nr))
    program += [(BPF_JEQ_K, 2, 0, numbers["ioctl"]), deny, allow,
                (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARG1_LOW)]
    for i, request in enumerate(ALLOWED_IOCTLS):
        program.append((BPF_JEQ_K, len(ALLOWED_IOCTLS) - i, 0, request))
    program += [deny, allow]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


MACHINE = os.uname().machine
SECCOMP_FILTER = seccomp_filter(MACHINE) if MACHINE in SYSCALL_TABLES else b""


def install_seccomp(bpf: bytes) -> None:
    """Layer 7: irreversibly restrict this process to the allow-list. Needs PR_SET_NO_NEW_PRIVS."""
    KERNEL.install_seccomp(bpf)


# --------------------------------------------------------------------------- Landlock
# Unprivileged file-system sandboxing (Linux >= 5.13). The rights below are "handled", i.e. denied
# unless a rule allows them: reading is allowed beneath the interpreter's library directories,
# reading and changing beneath the program's private space, executing nowhere.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS_EXECUTE = 1 << 0
LANDLOCK_READ_FILE, LANDLOCK_READ_DIR = 1 << 2, 1 << 3
LANDLOCK_FS_CHANGES = (          # (ABI version that introduced it, access right)
    (1, 1 << 1),                 # WRITE_FILE
    (1, 1 << 4),                 # REMOVE_DIR
    (1, 1 << 5),                 # REMOVE_FILE
    (1, 0x7F << 6),              # MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
    (2, 1 << 13),                # REFER: link or rename across directories
    (3, 1 << 14),                # TRUNCATE
)
LANDLOCK_IOCTL_DEV = 1 << 15     # ABI 5: ioctl on devices opened after the restriction
LANDLOCK_NET_TCP = 0b11          # ABI 4: BIND_TCP, CONNECT_TCP (no rule allows any port)
LANDLOCK_SCOPED = 0b11           # ABI 6: ABSTRACT_UNIX_SOCKET, SIGNAL (to outside the sandbox)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    return KERNEL.landlock_abi()


def readable_paths() -> list[str]:
    """What a program may read: the interpreter's standard library and installed packages (where
    sympy and friends live), and the time-zone files. Not the project, its data, runs or
    checkpoints, not /proc, /tmp or Ray's session files: nothing else at all."""
    paths = sysconfig.get_paths()
    candidates = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    candidates |= {"/etc/localtime", "/usr/share/zoneinfo"}
    return sorted(path for path in candidates if os.path.exists(path))


def install_landlock(workdir: str, abi: int, read_paths=()) -> None:
    """Layer 6: irreversibly confine file-system access: read `read_paths`, read and change
    beneath `workdir`, nothing else; no TCP; no signals or abstract sockets to outside processes.
    Needs PR_SET_NO_NEW_PRIVS."""
    changes = sum(right for since, right in LANDLOCK_FS_CHANGES if abi >= since)
    read = LANDLOCK_READ_FILE | LANDLOCK_READ_DIR
    handled = changes | read | LANDLOCK_ACCESS_FS_EXECUTE | (LANDLOCK_IOCTL_DEV if abi >= 5 else 0)
    attr_size = 24 if abi >= 6 else 16 if abi >= 4 else 8   # the fields this kernel knows
    ruleset = KERNEL.landlock_ruleset(handled, LANDLOCK_NET_TCP if abi >= 4 else 0,
                                      LANDLOCK_SCOPED if abi >= 6 else 0, attr_size)
    try:
        for path, access in [(workdir, changes | read)] + [(path, read) for path in read_paths]:
            try:
                beneath = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue                             # gone since the worker started: not readable
            try:
                if not stat.S_ISDIR(os.fstat(beneath).st_mode):
                    access = LANDLOCK_READ_FILE          # a file rule takes file rights only
                KERNEL.landlock_allow(ruleset, beneath, access)
            finally:
                os.close(beneath)
        KERNEL.landlock_restrict(ruleset)
    finally:
        os.close(ruleset)


# --------------------------------------------------------------------------- private space
def enter_private_space(workdir: str, scratch_mb: int) -> None:
    """Layer 2 (as root, before the privilege drop): new mount and IPC namespaces, and a tmpfs of
    `scratch_mb` MiB and SCRATCH_INODES inodes mounted on `workdir`, owned by nobody.

    The tmpfs caps what a program can write (fallocate, many files, deep directory chains) and it
    and every System V / POSIX IPC object the program makes disappear with its process: nothing is
    left on the host's disk or in `ipcs`, whatever the program did. The mount is private: the
    host never sees it."""
    KERNEL.unshare(CLONE_NEWNS | CLONE_NEWIPC)
    KERNEL.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    options = f"size={scratch_mb}m,nr_inodes={SCRATCH_INODES},mode=0700,uid={NOBODY},gid={NOBODY}"
    KERNEL.mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                 options.encode())


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
# Test-only extension modules that can write anywhere in memory, and
# ctypes: calls into C with no audit event (layer 8 removed it from sys.modules, so importing it
# again raises the "import" event).
BLOCKED_IMPORTS = frozenset({"_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                             "_ctypes_test", "_xxsubinterpreters", "_xxtestfuzz", "ctypes", "_ctypes"})
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
def set_rlimits(timeout_s: float, config: dict) -> None:
    """Layer 4: CPU time (SIGXCPU, then SIGKILL), address space, size of each file written, open
    files, no core dumps, no new processes or threads (counted per uid)."""
    cpu_s = math.ceil(timeout_s)
    for limit, value in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
                         (resource.RLIMIT_AS, (config["memory_mb"] << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (config["output_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (config["max_open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_NPROC, (0, 0))):
        resource.setrlimit(limit, value)


def drop_privileges() -> None:
    """Layer 5 (root only): become nobody, with no supplementary groups: no access to root's
    files, no capabilities, no signals to the host's processes."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def confine(workdir: str, timeout_s: float, config: dict, caps: dict, worker_pid: int) -> None:
    """Apply layers 4-7 to this process (the child): rlimits, nobody, Landlock, seccomp."""
    set_rlimits(timeout_s, config)
    if caps["drops_privileges"]:
        drop_privileges()
    # After the uid change, which resets it: die with the worker, never outlive it (seccomp's ban
    # on prctl keeps a program from clearing it).
    KERNEL.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:           # the worker died before the signal was set
        os._exit(1)
    KERNEL.prctl(PR_SET_NO_NEW_PRIVS, 1)
    if caps["landlock_abi"]:
        install_landlock(workdir, caps["landlock_abi"], caps["read_paths"])
    if caps["seccomp"]:
        install_seccomp(SECCOMP_FILTER)


def redirect_stdio() -> None:
    """Layer 3: keep only the result pipe (RESULT_FD); stdin from /dev/null, stdout/stderr into a
    file in the private space (the cwd)."""
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


def paper_number(value):
    """src/utils.py::floatify, as text for the reply: repr(float(value)), or None when float()
    raises (None, a word, a symbol); bool -> 1.0/0.0, "5" -> 5.0, a sympy number -> its float."""
    try:
        number = float(value)
    except Exception:
        return None
    return repr(number)


def paper_text(value) -> str:
    """str(value) as the paper's code compares a MathQA answer: lower-cased, quotes removed,
    stripped (None -> "none"); normalised before the cap, so that the cap never changes it."""
    return str(value).lower().replace('"', "").replace("'", "").strip()[:ANSWER_CHARS]


def execute(program: str, namespace: str = "plain") -> dict:
    """Run the program and call its solution(); the reply for the worker.

    "plain": the program runs as a module in fresh globals; solution() returning None is
    "no_answer". "paper": as src/python_engine.py::run, exec with the globals {math, sympy} and
    a separate, empty locals dict, then ``eval("solution()")`` in both. Top-level names land in
    the locals, so solution() sees math and sympy (and builtins) but not a helper, variable or
    import made at top level (NameError: as in the paper's code). Any returned value, None
    included, is "ok", with its `paper_text` as the answer and its `paper_number`.
    """
    try:
        if namespace == "paper":
            global_vars, local_vars = {"math": math, "sympy": sys.modules["sympy"]}, {}
            exec(compile(program, "<program>", "exec"), global_vars, local_vars)
            value = eval("solution()", global_vars, local_vars)
            return {"status": "ok", "answer": paper_text(value), "number": paper_number(value)}
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
              caps: dict, worker_pid: int, namespace: str = "plain") -> None:
    """The forked child: confine itself, run the program, write one JSON reply. Never returns."""
    try:
        os.dup2(result_fd, RESULT_FD)
        os.setpgid(0, 0)                        # layer 1: its own group, in the worker's session
        try:
            if caps["private_scratch"]:
                enter_private_space(workdir, config["scratch_mb"])
            os.chdir(workdir)
            redirect_stdio()
            confine(workdir, timeout_s, config, caps, worker_pid)
            forget_kernel_calls()
        except Exception as exc:                # fail closed: never run a program half-confined
            reply = {"status": "error", "detail": f"sandbox setup failed: {describe(exc)}"}
        else:
            # Imports compile from source instead of unmarshalling .pyc files (the hook refuses
            # marshal, which can build arbitrary bytecode).
            sys.pycache_prefix = os.path.join(workdir, "no-pycache")
            sys.dont_write_bytecode = True
            install_audit_hook(workdir)
            reply = execute(program, namespace)
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
    # The child leads its own group (setpgid); if it was killed before getting that far, kill it alone.
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_tree(path: str) -> None:
    """Delete `path` and whatever a program left beneath it. Never raises and never recurses:
    one open directory at a time and descriptor-relative calls, so neither the depth of a
    directory chain nor PATH_MAX matters. Symlinks are removed, never followed; directories made
    unreadable are opened up first; what cannot be removed is left and skipped."""
    parent, top = os.path.split(os.path.abspath(path))
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    names, stuck = [top], set()          # names: the path from `parent` down; fd holds names[-1]
    try:
        while names:
            try:
                info = os.stat(names[-1], dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode):
                    os.unlink(names[-1], dir_fd=fd)
                    names.pop()
                    continue
                os.chmod(names[-1], 0o700, dir_fd=fd)
                inner = os.open(names[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                inner = None
            deeper = None
            if inner is not None:
                with os.scandir(inner) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                if entry.inode() not in stuck:
                                    deeper = entry.name
                                    break
                            else:
                                os.unlink(entry.name, dir_fd=inner)
                        except OSError:
                            pass
            if deeper is not None:               # go down: one level deeper
                os.close(fd)
                fd, inner = inner, None
                names.append(deeper)
                continue
            if inner is not None:
                os.close(inner)
            try:
                os.rmdir(names[-1], dir_fd=fd)
            except OSError:
                try:
                    stuck.add(os.stat(names[-1], dir_fd=fd, follow_symlinks=False).st_ino)
                except OSError:
                    pass
            names.pop()
            if names:                            # go up: to the directory holding names[-1]
                up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = up
    except OSError:
        pass
    finally:
        os.close(fd)


def child_reply(data: bytes) -> dict:
    """Validate what a child wrote: a program can write to its result pipe too."""
    try:
        reply = json.loads(data)
        status, answer, detail = reply["status"], reply.get("answer"), reply.get("detail", "")
        number = reply.get("number")
        if number is not None:
            float(number)                       # a str that float() reads, or the reply is malformed
    except (ValueError, TypeError, KeyError, AttributeError):
        status = answer = detail = number = None
    if not (status in ("ok", "no_answer", "error") and isinstance(detail, str)
            and (isinstance(answer, str) if status == "ok" else answer is None)
            and (number is None or (status == "ok" and isinstance(number, str) and len(number) <= 64))):
        return {"status": "error", "answer": None, "detail": "malformed result from the program"}
    if status == "ok":
        answer = answer[:ANSWER_CHARS]
    return {"status": status, "answer": answer, "number": number, "detail": detail[:DETAIL_CHARS]}


def run_program(program: str, timeout_s: float, config: dict, caps: dict, namespace: str = "plain") -> dict:
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
            run_child(program, workdir, write_fd, timeout_s, config, caps, worker_pid, namespace)
        os.close(write_fd)
        try:
            data, timed_out = read_result(read_fd, start + timeout_s)
            seconds = time.monotonic() - start
        finally:
            os.close(read_fd)
            kill_process_group(pid)          # also after a normal exit: nothing may linger
            _, wait_status, usage = os.wait4(pid, 0)
    finally:
        remove_tree(workdir)                 # empty when the program wrote into its tmpfs

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


def in_throwaway_child(attempt) -> str:
    """Run attempt() in a forked child: "" when it returned, else what it raised."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                attempt()
                message = ""
            except Exception as exc:
                message = describe(exc)
            os.write(write_fd, message.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def seccomp_refuses_fork() -> None:
    KERNEL.prctl(PR_SET_NO_NEW_PRIVS, 1)
    install_seccomp(SECCOMP_FILTER)
    try:
        pid = os.fork()
    except PermissionError:
        return
    if pid == 0:
        os._exit(0)
    raise RuntimeError("the filter let fork() through")


def probe_capabilities(tmp_root: str) -> dict:
    """Which layers this machine supports; seccomp and the private space are tried for real in
    throwaway children. Needs KERNEL."""
    problems = []
    seccomp = bool(SECCOMP_FILTER)
    if not seccomp:
        problems.append(f"seccomp: no system call table for {MACHINE}")
    elif message := in_throwaway_child(seccomp_refuses_fork):
        seccomp = False
        problems.append(f"seccomp: {message}")
    abi = landlock_abi()
    if not abi:
        problems.append("landlock: not available in this kernel")
    drops_privileges = os.geteuid() == 0
    if not drops_privileges:
        problems.append("privilege drop: the worker is not root, programs run as the host's user")
    private_scratch = False
    if drops_privileges:
        probe_dir = tempfile.mkdtemp(prefix="probe-", dir=tmp_root)
        message = in_throwaway_child(lambda: enter_private_space(probe_dir, 1))
        remove_tree(probe_dir)
        private_scratch = not message
        if message:
            problems.append(f"private space: {message}")
    else:
        problems.append("private space: needs root; programs write into a plain directory")
    return {"pid": os.getpid(), "seccomp": seccomp, "landlock_abi": abi,
            "private_scratch": private_scratch, "drops_privileges": drops_privileges,
            "read_paths": readable_paths(), "problems": problems}


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
    global KERNEL
    config = json.loads(sys.argv[1])    # memory_mb, output_bytes, max_open_files, scratch_mb, tmp_root
    # The protocol moves to private descriptors; fds 0 and 1 become /dev/null, so that nothing
    # printed by accident can corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for module in PRELOADED_MODULES:
        __import__(module)
    drop_ctypes_references()
    KERNEL = load_kernel_calls()
    caps = probe_capabilities(config["tmp_root"])
    # Everything loaded so far stays as it is: the children's garbage collector skips it, so a
    # program does not pay for scanning (and copying, fork being copy-on-write) sympy's objects.
    gc.freeze()
    send(replies, caps)
    while (request := receive(requests)) is not None:   # EOF: the host is gone
        try:
            namespace = request.get("namespace", "plain")
            if namespace not in NAMESPACES:
                raise ValueError(f"namespace must be one of {NAMESPACES}, got {namespace!r}")
            reply = run_program(request["program"], float(request["timeout_s"]), config, caps, namespace)
        except Exception as exc:
            reply = {"status": "error", "answer": None, "seconds": 0.0,
                     "detail": f"sandbox worker error: {describe(exc)}"[:DETAIL_CHARS]}
        send(replies, reply)


if __name__ == "__main__":
    main()
