"""Run untrusted Python in a bubblewrap sandbox: `await Sandbox().run(code, limits)`.

Each run gets a fresh process tree in its own user, PID, network, IPC and UTS namespaces
(and can make no user namespace of its own: `--disable-userns`), a read-only view of the
part of /usr the system Python needs (`_usr_binds`: /usr/bin, its standard library, its
site-packages, its shared libraries, its dynamic loader, the time zones and locales),
fresh tmpfs mounts, capped in bytes and in files, for its working directory (/work),
/tmp and /dev/shm (all else is read-only), and nothing else of the host: not tokenmill's
data directory, source tree or virtualenv, nor any home directory, nor the rest of /usr
(/usr/share, /usr/include, /usr/src). Of /usr/local, the operator's own tree (its etc,
share and bin may hold configuration and credentials, e.g. an npmrc), only the Python's
site-packages directories there are shown. When the server runs as root, the sandbox
runs as `nobody`, so that the process limit applies (the kernel never limits root's
process count).

bwrap starts with oom_score_adj 1000 (`_OOM_FIRST`), inherited by the whole run, and /proc
is read-only inside, so the code cannot lower it: the kernel's OOM killer ends the run's
processes before the server's.

Inside, a small launcher (`_LAUNCHER`) mounts those tmpfs (bwrap's own `--tmpfs` caps
bytes, not files, and each file costs the kernel an inode no limit counts), holding
CAP_SYS_ADMIN (and CAP_SETPCAP) in the run's user namespace only; it then drops every
capability for good (bounding, ambient and its own sets, no_new_privs), so the code
cannot remount or unmount them. It then reads the code from stdin, forks, and runs it in
the child under rlimits: CPU seconds, address space, processes, file size. The launcher
then lists the files the code left in /work and writes that manifest to a pipe of its
own (its end is closed in the code's process). The code can still reopen that end
through /proc/<launcher>/fd (same user) and forge the manifest: that gains it nothing it
could not print or write itself, as the host only parses it, a binary format of lengths
it checks (`_manifest`), at a cost linear in what it reads.

The host side never blocks the event loop (asyncio subprocess and pipes), caps the
output it keeps, and kills the whole tree on the wall-clock deadline, on an output
overflow or when the awaiting task is cancelled: killing the outer bwrap makes the
namespace's init die (`--die-with-parent`), and the kernel then kills every process
left in the PID namespace.

CPU share: the run's session (its own autogroup) is set to nice 19
(`SandboxLimits.nice`) a quarter of a second into the run (a short run finishes at
normal priority), and the code's process to nice 19 too, so busy sandboxes take only
what the engine leaves idle (nice 19 weighs 15 against nice
0's 1024 in the Linux scheduler); RLIMIT_CPU ends a process that spends its CPU budget,
and `max_concurrent` bounds how many run at once, taken by owners in turn (`FairSlots`):
one user's queue of runs does not hold up another's.

The host starts bwrap in a new session (`start_new_session`): the sandbox has no
controlling terminal, so it cannot push input into the server's terminal (TIOCSTI), and
its /dev/pts is a fresh instance. A seccomp filter refuses setsid() inside, so the code
cannot move to a session (an autogroup) of its own at normal priority.

Without bwrap (or a usable system Python) `Sandbox.unavailable_reason()` says why and
`run` raises SandboxUnavailable: there is no unsandboxed fallback.
"""

from __future__ import annotations

import ast
import asyncio
import codecs
import contextlib
import errno
import logging
import os
import signal
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO

from orchestrator.slots import FairSlots

# Imports only what a run always needs (each import costs start-up time on every run).
_LAUNCHER = r"""
import ctypes, os, resource, sys
nice, report_bytes, max_files, manifest_fd, tmpfs_bytes, tmpfs_files, *rlimits = (
    int(v) for v in sys.argv[1].split())
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result < 0:  # "sandbox setup:" makes the host raise SandboxUnavailable
        sys.exit(f"sandbox setup: {what}: {os.strerror(ctypes.get_errno())}")
# The writable mounts, capped in bytes and in files, in a mount namespace of the
# launcher's own user namespace (bwrap's mount namespace belongs to the one above it).
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
for path in ("/work", "/tmp", "/dev/shm"):
    options = f"size={tmpfs_bytes},nr_inodes={tmpfs_files},mode=755".encode()
    nosuid_nodev = 6
    check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", nosuid_nodev, options), f"mount {path}")
os.chdir("/work")  # the new /work, not the directory beneath it
# Every capability, for good: the bounding set (PR_CAPBSET_READ, _DROP), the ambient set,
# the process's own sets (capset), and no exec may grant any (PR_SET_NO_NEW_PRIVS).
cap = 0
while (held := libc.prctl(23, cap, 0, 0, 0)) >= 0:
    if held:
        check(libc.prctl(24, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")
    cap += 1
check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
source = sys.stdin.buffer.read().decode("utf-8", "replace")
pid = os.fork()
if pid == 0:
    os.close(manifest_fd)
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    for i, name in enumerate(("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE",
                              "RLIMIT_CORE", "RLIMIT_NOFILE")):
        resource.setrlimit(getattr(resource, name), (rlimits[2 * i], rlimits[2 * i + 1]))
    os.nice(nice)  # start-up ran at normal priority: it is short
    status = 0
    # the code's own module as __main__, so pickle finds its functions (multiprocessing)
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    try:
        # As a notebook cell: a last statement that is an expression has its value's repr
        # printed unless None (`_ast` is built in: no import cost).
        import _ast
        tree = compile(source, "main.py", "exec", _ast.PyCF_ONLY_AST)
        last = tree.body.pop() if tree.body and type(tree.body[-1]) is _ast.Expr else None
        exec(compile(tree, "main.py", "exec"), main.__dict__)
        if last is not None:
            shown = eval(compile(_ast.Expression(last.value), "main.py", "eval"), main.__dict__)
            if shown is not None:
                print(repr(shown))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr); status = 1
    except BaseException as exc:  # the launcher's own frame is left out
        import linecache, traceback
        linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next); status = 1
    try:
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        os._exit(status)
_, wait_status = os.waitpid(pid, 0)
# The manifest (the host's `_manifest` reads it): the exit status, then each file's name,
# size, and its content (-1 for none reported), as little-endian integers and bytes.
out = [os.waitstatus_to_exitcode(wait_status).to_bytes(4, "little", signed=True)]
listed, budget = 0, report_bytes
for root, dirs, names in os.walk("/work"):
    dirs.sort()
    for name in sorted(names):
        path = os.path.join(root, name)
        if not os.path.isfile(path) or os.path.islink(path) or listed >= max_files:
            continue
        size = os.path.getsize(path)
        content = None
        if size <= budget:
            with open(path, "rb") as f:
                content = f.read(size)
            budget -= size
        shown = os.fsencode(os.path.relpath(path, "/work"))
        kept = -1 if content is None else len(content)
        out += [len(shown).to_bytes(4, "little"), shown, size.to_bytes(8, "little"),
                kept.to_bytes(8, "little", signed=True), content or b""]
        listed += 1
with os.fdopen(manifest_fd, "wb") as f:
    f.write(b"".join(out))
"""


log = logging.getLogger(__name__)
# The run is the first the kernel's OOM killer ends: bwrap starts with oom_score_adj 1000,
# which every process of the run inherits and none can lower (/proc is read-only inside).
# RLIMIT_AS bounds each process, not the run: 32 processes of 1 GiB outgrow a host of
# 23 GiB, and the OOM killer otherwise ends the biggest process, the server.
_OOM_FIRST = ("/bin/sh", "-c", 'echo 1000 > /proc/self/oom_score_adj && exec "$@"', "sh")
# The most files a run's result lists (the launcher lists no more), and the manifest's
# fields (`_manifest`): the exit status; each file's name length, then its size and how
# many bytes of its content follow.
MAX_REPORTED_FILES = 1000
_STATUS, _NAME_LENGTH, _SIZES = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<Qq")
# How long a killed run's pipes may take to reach their end (the kernel tears the
# namespace down asynchronously).
_DRAIN_SECONDS = 10


def _instruction(code: int, k: int, jump_true: int = 0, jump_false: int = 0) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k)


_LOAD_ARCH, _LOAD_NR = _instruction(0x20, 4), _instruction(0x20, 0)  # seccomp_data fields
_KILL, _ALLOW = _instruction(0x06, 0x80000000), _instruction(0x06, 0x7FFF0000)
_EPERM = _instruction(0x06, 0x00050000 | errno.EPERM)
# machine -> (AUDIT_ARCH_*, the numbers of the calls refused: setsid, memfd_create,
# memfd_secret, shmget, io_uring_setup, io_uring_enter, io_uring_register); x86-64 also
# refuses the x32 ABI's numbers.
_ARCHES = {
    "x86_64": (0xC000003E, (112, 319, 447, 29, 425, 426, 427)),
    "aarch64": (0xC00000B7, (157, 279, 447, 194, 425, 426, 427)),
}


def seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter refusing (EPERM) setsid() and the memory no rlimit
    counts, and killing calls of another ABI. A new session would be a new autogroup, out
    of the nice-19 group the run is in. memfd_create's files and System V segments hold
    memory outside the address space RLIMIT_AS bounds (a run held 3 GiB of them under a
    1 GiB limit), and /dev/shm, the POSIX way, is a capped tmpfs. io_uring, which no
    Python needs, is a large part of the kernel open to unprivileged code (the source of
    several local privilege escalations), whose operations run past any seccomp filter.
    None on machines not listed (there the code could leave its priority group and hold
    that memory)."""
    machine = os.uname().machine
    if machine not in _ARCHES:
        return None
    arch, refused = _ARCHES[machine]
    x32 = [_instruction(0x35, 0x40000000, 0, 1), _KILL] if machine == "x86_64" else []
    checks = [b"".join((_instruction(0x15, nr, 0, 1), _EPERM)) for nr in refused]
    return b"".join(
        [_LOAD_ARCH, _instruction(0x15, arch, 1, 0), _KILL, _LOAD_NR, *x32, *checks, _ALLOW]
    )


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (no bwrap, no namespaces): the message says why."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 30.0
    cpu_seconds: int = 20
    memory_bytes: int = 1 << 30  # address space of each process
    processes: int = 32  # processes and threads inside the sandbox
    # open files of each process: bounds the pipes' and sockets' buffers it can fill
    open_files: int = 256
    file_bytes: int = 32 << 20  # largest file the code may write
    workdir_bytes: int = 64 << 20  # size of the /work tmpfs (and of /tmp and /dev/shm)
    # files, directories and links each of them may hold (its root included): each costs
    # the kernel an inode, which no size cap counts
    workdir_files: int = 16 << 10
    output_bytes: int = 1 << 20  # stdout + stderr kept; more stops the run
    report_bytes: int = 4 << 20  # file contents returned in the result, in total
    nice: int = 19
    nice_after_seconds: float = 0.25  # the run's first moments go at normal priority


@dataclass
class SandboxFile:
    path: str  # relative to the working directory
    size: int
    content: bytes | None  # None when over the limits' report budget


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: no status (killed)
    timed_out: bool
    output_truncated: bool  # stdout+stderr passed output_bytes and the run was stopped
    files: list[SandboxFile] = field(default_factory=list)
    seconds: float = 0.0  # start to result, as the host saw it


@dataclass
class _Output:
    """stdout and stderr as kept, with the cap shared between them."""

    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, buffer: bytearray, data: bytes) -> bool:
        """Keep `data` up to the cap; False once the cap is passed."""
        room = self.limit - len(self.stdout) - len(self.stderr)
        buffer += data[: max(room, 0)]
        if len(data) > room:
            self.truncated = True
        return not self.truncated


class Sandbox:
    def __init__(
        self,
        limits: SandboxLimits | None = None,
        bwrap: str = "/usr/bin/bwrap",
        python: str = "/usr/bin/python3",
        max_concurrent: int = 4,
        usr_local: str = "/usr/local",
    ) -> None:
        """`usr_local` is the host directory whose parts on the Python's import path appear
        under the sandbox's /usr/local (a test points it at a directory of its own)."""
        self.limits = limits or SandboxLimits()
        self.bwrap = bwrap
        self.python = python
        self.usr_local = usr_local
        self._slots = FairSlots(max_concurrent)

    def unavailable_reason(self) -> str | None:
        if not os.access(self.bwrap, os.X_OK):
            return (
                f"the code sandbox needs bubblewrap ({self.bwrap} not found; "
                "install it with `apt-get install bubblewrap`)"
            )
        if not self.python.startswith("/usr/") or not os.access(self.python, os.X_OK):
            return f"the code sandbox needs a system Python under /usr ({self.python} not found)"
        if os.path.realpath(self.python).startswith("/usr/local/"):
            return (
                f"the code sandbox needs a system Python outside /usr/local ({self.python} "
                "is there, and the sandbox shows only /usr/local's Python packages)"
            )
        return None

    async def run(
        self,
        code: str,
        limits: SandboxLimits | None = None,
        label: str | None = None,
        owner: str = "",
    ) -> SandboxResult:
        """Run `code` as a notebook cell, once one of the slots `owner`'s turn gives it is
        free. `label` tags the sandbox's command line (for operators' `ps` and for tests
        that look for leftover processes)."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise SandboxUnavailable(reason)
        python_paths = await _python_paths(self.python)
        async with self._slots.hold(owner):
            return await self._run(
                code, limits or self.limits, label or uuid.uuid4().hex, python_paths
            )

    def _argv(
        self,
        limits: SandboxLimits,
        manifest_fd: int,
        seccomp_fd: int | None,
        label: str,
        python_paths: tuple[str, ...],
    ) -> list[str]:
        settings = [
            limits.nice,
            limits.report_bytes,
            MAX_REPORTED_FILES,
            manifest_fd,
            limits.workdir_bytes,
            limits.workdir_files,
            # soft and hard: CPU, address space, processes, file size, core, open files
            limits.cpu_seconds,
            limits.cpu_seconds + 1,
            limits.memory_bytes,
            limits.memory_bytes,
            limits.processes,
            limits.processes,
            limits.file_bytes,
            limits.file_bytes,
            0,
            0,
            limits.open_files,
            limits.open_files,
        ]
        return [
            *_OOM_FIRST,
            self.bwrap,
            "--unshare-all",
            # and no user namespace of the code's own, where it would hold every capability
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--hostname",
            "sandbox",
            # /usr: only what the Python needs, on an empty read-only tmpfs
            "--tmpfs",
            "/usr",
            *_usr_binds(python_paths, self.usr_local),
            "--remount-ro",
            "/usr",
            *(arg for path in _ETC_DATA for arg in ("--ro-bind-try", path, path)),
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--remount-ro",  # its oom_score_adj (see _OOM_FIRST) cannot be lowered
            "/proc",
            "--dev",
            "/dev",
            # /dev is a tmpfs of bwrap's own, writable and as large as half the RAM: it is
            # read-only, and the launcher mounts capped tmpfs on /dev/shm, /work and /tmp
            # (bwrap cannot cap their files), holding CAP_SYS_ADMIN in the run's user
            # namespace only until then
            "--remount-ro",
            "/dev",
            "--dir",
            "/work",
            "--dir",
            "/tmp",
            "--remount-ro",
            "/",
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--cap-add",
            "CAP_SETPCAP",  # to empty the bounding set
            "--chdir",
            "/work",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin",
            "--setenv",
            "HOME",
            "/work",
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--setenv",
            "PYTHONDONTWRITEBYTECODE",
            "1",
            "--setenv",
            "MPLBACKEND",
            "Agg",
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--",
            self.python,
            "-I",
            "-c",
            _LAUNCHER,
            " ".join(map(str, settings)),
            f"tokenmill-sandbox:{label}",  # see running_pids
        ]

    async def _run(
        self, code: str, limits: SandboxLimits, label: str, python_paths: tuple[str, ...]
    ) -> SandboxResult:
        started = time.monotonic()
        read_end, write_end = os.pipe()
        program = seccomp_program()
        seccomp_fd = _pipe_with(program) if program is not None else None
        passed = (write_end,) if seccomp_fd is None else (write_end, seccomp_fd)
        # As root the process limit would not apply, and file permissions would not help.
        user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(limits, write_end, seccomp_fd, label, python_paths),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=passed,
                start_new_session=True,
                # bwrap's init (pid 1 inside, the code's own user) keeps the environment
                # it was started with, readable in /proc/1/environ: none of the server's,
                # and the PWD that /bin/sh (_OOM_FIRST) exports names no host directory
                env={},
                cwd="/",
                **user,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            for fd in passed:
                os.close(fd)
        manifest_pipe = os.fdopen(read_end, "rb", 0)
        lowering = asyncio.create_task(
            _lower_autogroup(proc.pid, limits.nice, limits.nice_after_seconds)
        )
        output = _Output(limits.output_bytes)
        manifest = bytearray()
        timed_out = False
        try:
            async with asyncio.timeout(limits.wall_seconds):
                await asyncio.gather(
                    _feed(proc, code.encode()),
                    _pump(proc, proc.stdout, output, output.stdout),
                    _pump(proc, proc.stderr, output, output.stderr),
                    _read_manifest(manifest_pipe, manifest, _manifest_limit(limits)),
                )
                await proc.wait()
        except TimeoutError:
            timed_out = True
        finally:
            lowering.cancel()
            _kill(proc)
            manifest_pipe.close()  # already closed unless the run ended before reading
            await asyncio.shield(_reap(proc))
        return _result(proc.returncode, manifest, output, timed_out, time.monotonic() - started)


def _manifest_limit(limits: SandboxLimits) -> int:
    """The most bytes of a manifest the host reads: every file's content the report holds,
    and each listed file's entry with the longest name (PATH_MAX)."""
    return 4 + limits.report_bytes + MAX_REPORTED_FILES * (_NAME_LENGTH.size + 4096 + _SIZES.size)


def _manifest(data: bytes) -> tuple[int, list[SandboxFile]]:
    """The launcher's manifest: (the code's exit status, the files it lists). The code can
    write the manifest's pipe itself (see the module's docstring), so it is read as
    untrusted bytes, on the event loop: every length checked, at most MAX_REPORTED_FILES
    entries, at a cost linear in its size whatever it holds. ValueError if malformed."""
    try:
        (status,) = _STATUS.unpack_from(data)
        at, files = _STATUS.size, []
        while at < len(data):
            if len(files) == MAX_REPORTED_FILES:
                raise ValueError("the manifest lists too many files")
            (name_length,) = _NAME_LENGTH.unpack_from(data, at)
            name = data[at + _NAME_LENGTH.size : at + _NAME_LENGTH.size + name_length]
            size, kept = _SIZES.unpack_from(data, at + _NAME_LENGTH.size + name_length)
            at += _NAME_LENGTH.size + name_length + _SIZES.size
            if kept < -1 or at + kept > len(data):
                raise ValueError("a file's content in the manifest is cut short")
            content = data[at : at + kept] if kept >= 0 else None
            at += max(kept, 0)
            # a name need not be UTF-8: the result carries text that encodes
            files.append(SandboxFile(name.decode("utf-8", "replace"), size, content))
    except struct.error as exc:
        raise ValueError(f"the manifest is cut short: {exc}") from None
    return status, files


def _text(data: bytearray, cut: bool) -> str:
    """Output as text, bytes that are not UTF-8 as U+FFFD; of output the cap `cut`, less
    the character the cut fell inside, whose bytes are not all there (a U+FFFD would
    stand for it, as for a byte the code wrote wrong)."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(bytes(data), final=not cut)


def _result(
    returncode: int | None, manifest: bytes, output: _Output, timed_out: bool, seconds: float
) -> SandboxResult:
    stderr = _text(output.stderr, output.truncated)
    files: list[SandboxFile] = []
    exit_code = None if timed_out or output.truncated else returncode
    if manifest and not timed_out:
        with contextlib.suppress(ValueError):  # not the launcher's (the code wrote it)
            exit_code, files = _manifest(bytes(manifest))
    elif returncode == 1 and stderr.startswith(("bwrap:", "sandbox setup:")):
        raise SandboxUnavailable(f"the code sandbox could not start: {stderr.strip()}")
    return SandboxResult(
        _text(output.stdout, output.truncated),
        stderr,
        exit_code,
        timed_out,
        output.truncated,
        files,
        seconds,
    )


def running_pids(label: str) -> list[int]:
    """Host pids of the run labelled `label` (its command line carries the label)."""
    tag = f"tokenmill-sandbox:{label}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if tag in f.read():
                        pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return pids


# Data the Python or its packages read from outside their own directories (relative to
# /usr): glibc's compiled locales (C.UTF-8) and Debian's python3-matplotlib's mpl-data.
_USR_DATA = ("lib/locale", "share/matplotlib")
# Of /etc (not shown otherwise): Debian's alternatives, through which its packages' shared
# libraries link (python3-numpy's libblas.so.3 and liblapack.so.3), and the configuration
# file Debian's python3-matplotlib fails to import without.
_ETC_DATA = ("/etc/alternatives", "/etc/matplotlibrc")
_PYTHON_PATHS: dict[str, tuple[str, ...]] = {}
# Asked of the sandbox's Python: its import path (less the site-packages, which `-S` leaves
# out), its site-packages, the directory of its shared libraries, its time-zone search path.
_PROBE = """
import os, site, sys, sysconfig
tz = (sysconfig.get_config_var("TZPATH") or "").split(os.pathsep)
print(repr([*sys.path, *site.getsitepackages(), sysconfig.get_config_var("LIBDIR"), *tz]))
"""


async def _python_paths(python: str) -> tuple[str, ...]:
    """The paths under /usr that `python` reads (its standard library, packages, shared
    libraries, time zones and dynamic loader); asked once per interpreter. `-S` keeps the
    packages' .pth files from running on the host. The loader is named as under a merged
    /usr (/lib64/ld-linux-x86-64.so.2 is /usr/lib64/ld-linux-x86-64.so.2), the layout the
    sandbox's /lib and /lib64 symlinks assume."""
    if python not in _PYTHON_PATHS:
        proc = await asyncio.create_subprocess_exec(
            python,
            "-I",
            "-S",
            "-c",
            _PROBE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise SandboxUnavailable(
                f"the code sandbox could not ask {python} for its directories: {err.decode()}"
            )
        paths = ast.literal_eval(out.decode())
        loader = _elf_interpreter(os.path.realpath(python))
        if loader is not None:
            paths.append(loader if loader.startswith("/usr/") else "/usr" + loader)
        paths = [p for p in paths if p.startswith("/usr/")]
        _PYTHON_PATHS[python] = tuple(dict.fromkeys(os.path.normpath(p) for p in paths))
    return _PYTHON_PATHS[python]


def _elf_interpreter(executable: str) -> str | None:
    """The dynamic loader `executable` names (its ELF PT_INTERP, e.g.
    /lib64/ld-linux-x86-64.so.2), or None for a static or non-ELF file."""
    with open(executable, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return None
        order = "<" if header[5] == 1 else ">"
        # 64- or 32-bit: where e_phoff is, how to reach e_phentsize from it, and the
        # layout of a program header from p_offset to p_filesz
        at, table, entry_layout = (
            (32, "Q14xHH", "Q16xQ") if header[4] == 2 else (28, "I10xHH", "I8xI")
        )
        phoff, phentsize, phnum = struct.unpack_from(order + table, header, at)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            entry = f.read(phentsize)
            if struct.unpack_from(order + "I", entry)[0] == 3:  # PT_INTERP
                offset, size = struct.unpack_from(
                    order + entry_layout, entry, 8 if header[4] == 2 else 4
                )
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _usr_binds(python_paths: tuple[str, ...], usr_local: str) -> list[str]:
    """bwrap arguments showing, read-only, what of /usr the sandbox's Python needs: the
    programs (/usr/bin), `python_paths` and `_USR_DATA`. A path under /usr/local is bound
    from `usr_local`; one the host lacks is left out."""
    shown = ["/usr/bin", *python_paths, *(os.path.join("/usr", d) for d in _USR_DATA)]
    return [
        arg
        for path in shown
        for arg in (
            "--ro-bind-try",
            os.path.join(usr_local, os.path.relpath(path, "/usr/local"))
            if path.startswith("/usr/local/")
            else path,
            path,
        )
    ]


def _pipe_with(data: bytes) -> int:
    """The read end of a pipe already holding `data` (a few hundred bytes at most)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


async def _lower_autogroup(pid: int, nice: int, delay: float) -> None:
    """After `delay`, give the run's session the priority `nice`. The session is an
    autogroup, a scheduling group that competes with the server's as an equal whatever its
    tasks' nice values. The delay lets a short run (start-up and a quick script) finish at
    normal priority; what keeps running is held to `nice`. Without CAP_SYS_ADMIN the
    kernel accepts one such change per 100 ms system-wide (EAGAIN), so runs take turns."""
    await asyncio.sleep(delay)
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(nice))
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN:  # no autogroups here: task nice is enough
                return
        await asyncio.sleep(0.02)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()


async def _pump(
    proc: asyncio.subprocess.Process,
    stream: asyncio.StreamReader | None,
    output: _Output,
    buffer: bytearray,
) -> None:
    assert stream is not None
    while chunk := await stream.read(1 << 16):
        if not output.add(buffer, chunk):
            _kill(proc)
            return


async def _read_manifest(pipe: BinaryIO, into: bytearray, limit: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while (chunk := await reader.read(1 << 16)) and len(into) < limit:
            into += chunk
    finally:
        transport.close()


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for the killed run, then read its output pipes to their end. A pipe whose reader
    stopped early (output over its cap) stays open otherwise, and its transport is closed
    only by the garbage collector, after the event loop has gone, which raises there."""
    await proc.wait()
    try:
        # The namespace dies with bwrap (--die-with-parent), which closes every write end.
        async with asyncio.timeout(_DRAIN_SECONDS):
            for stream in (proc.stdout, proc.stderr):
                assert stream is not None
                while await stream.read(1 << 16):
                    pass
    except TimeoutError:
        log.warning("a sandbox run's output pipes stayed open %ss after it ended", _DRAIN_SECONDS)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the outer bwrap's process group; the namespace dies with it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
