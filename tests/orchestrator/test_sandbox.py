"""The sandbox runs code and contains it: each escape attempt fails inside the sandbox,
and the host (this test process) stays healthy, with no process of the run left over."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import tracemalloc
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.sandbox import (
    Sandbox,
    SandboxResult,
    SandboxUnavailable,
    _Output,
    _result,
    running_pids,
)
from tests.orchestrator.sandbox_helpers import FAST, host_can_spawn, wait_until_gone

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, limits=FAST, sandbox: Sandbox | None = None) -> tuple[SandboxResult, str]:
    label = uuid.uuid4().hex
    result = asyncio.run((sandbox or Sandbox()).run(textwrap.dedent(code), limits, label=label))
    assert wait_until_gone(label) == [], "a sandbox process outlived its run"
    assert host_can_spawn()
    assert unclosed_transports() == [], "a pipe of the run outlived its event loop"
    return result, label


@pytest.fixture(autouse=True, scope="module")
def _collect_only_this_modules_objects():
    """Freeze the objects alive before this module's tests (gc.freeze), so that each run's
    collection below scans only what was made since: a full collection of a pytest worker
    that has imported torch and run other files took 0.2 to 1.5 s, after every run. The
    runs' transports are made after the freeze, so the collection still finds them."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def unclosed_transports() -> list[str]:
    """What the garbage collector finds still open of the runs' pipes. A transport closed
    that late raises inside whatever code the collector interrupts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if "unclosed transport" in str(w.message)]


def test_runs_code_and_reports_output_status_and_files():
    result, _ = run("""
        import os, sys
        print("out"); print("err", file=sys.stderr)
        os.makedirs("plots")
        open("plots/a.txt", "w").write("hello")
        open("b.bin", "wb").write(bytes(range(5)))
        sys.exit(3)
    """)
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not result.timed_out and not result.output_truncated
    files = {f.path: f.content for f in result.files}
    assert files == {"plots/a.txt": b"hello", "b.bin": bytes(range(5))}


def test_a_process_pool_runs_the_codes_own_functions():
    result, _ = run("""
        from multiprocessing import Pool

        def square(x):
            return x * x

        with Pool(2) as pool:
            print(pool.map(square, range(5)))
    """)
    assert (result.stdout, result.exit_code) == ("[0, 1, 4, 9, 16]\n", 0), result


def test_an_exception_gives_its_traceback_and_status_1():
    result, _ = run("x = 1\nraise ValueError('boom')\n")
    assert result.exit_code == 1
    assert "raise ValueError('boom')" in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: boom")


def test_a_last_expression_shows_its_value_as_in_a_notebook():
    """Models write a bare `2**100` last, as in OpenAI's notebook-like tool: its repr is
    printed after what the code printed, None shows nothing, an error in it is the run's."""
    shown, _ = run("values = [1, 2]\nprint('sum:')\n(sum(values)\n * 14)\n")
    assert (shown.stdout, shown.exit_code) == ("sum:\n42\n", 0), shown
    quiet, _ = run("print('only')\nprint('this')\n")
    assert quiet.stdout == "only\nthis\n"
    failed, _ = run("x = {}\nx['missing']\n")
    assert failed.exit_code == 1 and failed.stdout == ""
    assert 'File "main.py", line 2' in failed.stderr and "KeyError: 'missing'" in failed.stderr
    broken, _ = run("1 +\n")
    assert broken.exit_code == 1 and "SyntaxError" in broken.stderr


def test_a_users_queue_of_runs_does_not_hold_up_anothers_first():
    sandbox = Sandbox(FAST, max_concurrent=1)
    finished: list[str] = []

    async def one(owner: str, n: int) -> None:
        await sandbox.run(f"print({n})", owner=owner)
        finished.append(f"{owner}{n}")

    async def scenario() -> None:
        # The interpreter's paths asked once first: no run then waits on that probe, so the
        # runs reach the slots in the order they start.
        await sandbox.run("pass", owner="warm-up")
        alice = [asyncio.ensure_future(one("alice", n)) for n in range(3)]
        await asyncio.sleep(0)  # alice's three are queued first
        await asyncio.gather(*alice, one("bob", 0))

    asyncio.run(scenario())
    assert finished == ["alice0", "bob0", "alice1", "alice2"]


def test_cannot_connect_to_a_server_on_the_hosts_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        result, _ = run(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("CONNECTED")
            except OSError as exc:
                print("blocked", type(exc).__name__)
        """)
        assert result.stdout.startswith("blocked"), result
        with pytest.raises(BlockingIOError):
            server.accept()


def test_cannot_reach_an_outside_address_or_resolve_names():
    result, _ = run("""
        import socket
        for target in [("1.1.1.1", 53), ("8.8.8.8", 443), ("pypi.org", 443)]:
            try:
                socket.create_connection(target, timeout=2)
                print("CONNECTED", target)
            except OSError as exc:
                print("blocked", target, type(exc).__name__)
    """)
    assert result.stdout.count("blocked") == 3, result


def test_cannot_read_the_data_dir_the_source_tree_or_home(tmp_path):
    database = tmp_path / "tokenmill.db"
    database.write_text("SECRET-DB")
    home_file = Path.home() / f".tokenmill-sandbox-test-{uuid.uuid4().hex}"
    home_file.write_text("SECRET-HOME")
    try:
        paths = [
            database,
            home_file,
            ROOT / "orchestrator" / "sandbox.py",
            Path.home(),
            tmp_path,
            ROOT,
        ]
        result, _ = run(f"""
            import os
            for path in {[str(p) for p in paths]!r}:
                try:
                    if os.path.isdir(path):
                        print("LISTED", path, os.listdir(path))
                    else:
                        print("READ", path, open(path).read()[:20])
                except OSError as exc:
                    print("blocked", type(exc).__name__)
        """)
    finally:
        home_file.unlink()
    assert result.stdout.count("blocked") == len(paths), result
    assert "SECRET" not in result.stdout


def test_cannot_read_the_servers_environment(monkeypatch, tmp_path):
    """The server's environment holds its secrets (API keys, database URLs): no process
    of the run carries it, not even bwrap's own init (pid 1 inside, the code's user), nor
    the server's working directory (a shell sets PWD to it)."""
    monkeypatch.setenv("TOKENMILL_PROBE_API_KEY", "sk-probe-secret")
    monkeypatch.chdir(tmp_path)
    result, _ = run(f"""
        import os
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            environ = open(f"/proc/{{pid}}/environ", "rb").read()
            leaked = b"sk-probe-secret" in environ or {str(tmp_path).encode()!r} in environ
            print(pid, "LEAKED" if leaked else "clean")
    """)
    assert result.exit_code == 0 and "1 clean" in result.stdout.splitlines(), result
    assert "LEAKED" not in result.stdout, result


def test_shared_memory_is_capped_like_the_working_directory():
    result, _ = run("""
        import multiprocessing
        multiprocessing.Lock()  # POSIX semaphores live in /dev/shm: they still work
        try:
            for i in range(400):  # files of 512 KiB, within the per-file limit
                with open(f"/dev/shm/fill{i}", "wb") as f:
                    f.write(bytes(1 << 19))
            print("WROTE 200 MiB")
        except OSError as exc:
            print("capped", exc.errno)
    """)
    assert result.stdout.strip() == "capped 28", result  # ENOSPC


def test_the_writable_mounts_hold_a_bounded_number_of_files():
    """Each empty file costs the kernel an inode, which no size cap counts: without a
    bound, a run made millions within its time limit."""
    result, _ = run(
        """
        for directory in ("/work", "/tmp", "/dev/shm"):
            made = 0
            try:
                while made < 100_000:
                    open(f"{directory}/{made}", "w").close()
                    made += 1
            except OSError as exc:
                print(directory, made <= 64, exc.strerror)
        """,
        replace(FAST, workdir_files=64),
    )
    assert result.stdout.splitlines() == [
        f"{directory} True No space left on device" for directory in ("/work", "/tmp", "/dev/shm")
    ], result


def test_the_code_holds_no_capability_and_cannot_remount():
    """The launcher mounts the writable tmpfs mounts (with their file limit) holding
    CAP_SYS_ADMIN in the sandbox's user namespace, then drops every capability before the
    code runs: the code can neither lift the limits nor get a capability back."""
    result, _ = run("""
        import ctypes, subprocess
        for line in open("/proc/self/status"):
            if line.startswith("Cap"):
                print(line.split()[0], int(line.split()[1], 16))
        libc = ctypes.CDLL(None, use_errno=True)
        remount = libc.mount(b"tmpfs", b"/work", b"tmpfs", 32, b"nr_inodes=1000000")
        print("remount", remount, ctypes.get_errno())  # MS_REMOUNT
        print("mount", libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b""), ctypes.get_errno())
        print("umount", libc.umount2(b"/work", 2), ctypes.get_errno())  # MNT_DETACH
        command = ["mount", "-o", "remount,nr_inodes=1000000", "/work"]
        print("mount(8)", subprocess.run(command, capture_output=True).returncode)
        status = subprocess.run(["grep", "^Cap", "/proc/self/status"], capture_output=True)
        print("child", sorted({line.split()[1] for line in status.stdout.splitlines()}))
    """)
    lines = result.stdout.splitlines()
    assert lines[:5] == ["CapInh: 0", "CapPrm: 0", "CapEff: 0", "CapBnd: 0", "CapAmb: 0"], result
    assert lines[5:9] == ["remount -1 1", "mount -1 1", "umount -1 1", "mount(8) 32"], result
    assert lines[9:] == ["child [b'0000000000000000']"], result  # what it starts has none


def test_memory_no_rlimit_counts_is_refused():
    """memfd_create's files and System V segments hold memory outside the address space
    RLIMIT_AS bounds (a run held 3 GiB of them under a 1 GiB limit); the seccomp filter
    refuses both, and each process may open 256 files (pipes and sockets buffer memory)."""
    result, _ = run("""
        import ctypes, os, resource
        try:
            os.memfd_create("hold")
            print("MEMFD")
        except OSError as exc:
            print("memfd", exc.errno)
        libc = ctypes.CDLL(None, use_errno=True)
        segment = libc.shmget(0, 1 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        print("shmget", segment, ctypes.get_errno())
        print("open files", *resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    assert result.stdout == "memfd 1\nshmget -1 1\nopen files 256 256\n", result


def test_the_code_cannot_use_io_uring():
    """io_uring is kernel code open to unprivileged processes (several local privilege
    escalations), and its operations run past any seccomp filter: the filter refuses it."""
    result, _ = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        print("io_uring_setup", libc.syscall(425, 4, params), ctypes.get_errno())
    """)
    assert result.stdout == "io_uring_setup -1 1\n", result  # EPERM


def test_the_code_cannot_make_a_user_namespace():
    """In a user namespace of its own the code would hold every capability: the kernel's
    code behind them (netfilter, mounts of tmpfs, overlayfs) is open to it."""
    result, _ = run("""
        import ctypes, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        print("unshare", libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
        print(subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode)
    """)
    assert result.stdout == "unshare -1 28\n1\n", result  # ENOSPC: none may be made


def test_a_file_name_that_is_not_utf8_is_reported_as_text():
    result, _ = run("""
        open(b"r\\xffport.csv", "wb").write(b"x")
    """)
    [written] = result.files
    assert written.path == "r\ufffdport.csv" and written.content == b"x"
    written.path.encode()  # no lone surrogate: it goes into JSON and the next prompt


@pytest.fixture
def usr_local():
    """A directory standing in for the host's /usr/local, readable by the sandbox's user
    (nobody when the tests run as root; pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory() as local:
        os.chmod(local, 0o755)
        yield Path(local)


def test_a_forged_manifest_costs_the_host_no_more_than_its_bytes():
    """Where the server runs as a user other than root, the code can reopen the launcher's
    manifest pipe (/proc/<launcher>/fd) and write it itself. Whatever it writes, the host
    reads it at a cost of its size, on its event loop: half a million small values as a
    Python literal took seconds and over 500 MB to parse (17 MiB of them, 27 s and 8.5 GB)."""
    forged = bytearray(b"(0, [" + b"0," * (1 << 19) + b"])")
    entries = b"".join(  # well formed, but more entries than a run lists
        len(b"f").to_bytes(4, "little") + b"f" + (0).to_bytes(8, "little") * 2
        for _ in range(20_000)
    )
    for manifest in (forged, bytearray(b"\0\0\0\0" + entries)):
        tracemalloc.start()
        try:
            result = _result(7, manifest, _Output(1 << 10), False, 0.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(manifest) + (1 << 20)
        assert (result.exit_code, result.files) == (7, [])


def test_usr_local_shows_only_the_pythons_packages(usr_local):
    """/usr/local is the operator's tree (its etc, share and bin may hold credentials, e.g.
    an npmrc): inside, only the Python's site-packages there exist. `usr_local` stands in
    for the host's /usr/local, so the test places files without touching the real one."""
    site_dirs = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", "import site; print(*site.getsitepackages())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    local_site_dirs = [
        Path(d).relative_to("/usr/local") for d in site_dirs if d.startswith("/usr/local/")
    ]
    assert local_site_dirs, "the system Python has no site-packages under /usr/local"
    for rel in local_site_dirs:
        (usr_local / rel).mkdir(parents=True)
        (usr_local / rel / "tokenmill_probe.py").write_text("VALUE = 'importable'\n")
    hidden = ["etc/npmrc", "share/operator/token", "bin/deploy", "lib/secret.txt"]
    for rel in hidden:
        (usr_local / rel).parent.mkdir(parents=True, exist_ok=True)
        (usr_local / rel).write_text("SECRET")
    paths = [f"/usr/local/{rel}" for rel in hidden] + ["/usr/local/etc", "/usr/local/share"]
    result, _ = run(
        f"""
        import os, tokenmill_probe
        print(tokenmill_probe.VALUE)
        for path in {paths!r}:
            print("EXISTS" if os.path.exists(path) else "hidden", path)
        try:
            open("/usr/local/escape", "w")
            print("WROTE /usr/local/escape")
        except OSError as exc:
            print("blocked", type(exc).__name__)
        """,
        sandbox=Sandbox(usr_local=str(usr_local)),
    )
    assert result.stdout.splitlines()[0] == "importable", result
    assert result.stdout.count("hidden") == len(paths), result
    assert result.stdout.rstrip().endswith("blocked OSError"), result  # read-only


def test_usr_shows_only_what_the_python_needs():
    """Of /usr only the Python, its libraries and their data exist inside: the common
    modules work (time zones, locale, SQLite, TLS, programs run through subprocess, also
    those Debian links through /etc/alternatives), and
    the rest of the system (headers, sources, /usr/share's documents) does not."""
    result, _ = run("""
        import ctypes, datetime, decimal, hashlib, json, locale, math, os, sqlite3, ssl
        import statistics, subprocess, zoneinfo
        paris = datetime.datetime(2024, 7, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
        print(paris.utcoffset(), locale.getpreferredencoding())
        print(sqlite3.connect(":memory:").execute("select 6 * 7").fetchone()[0])
        print(subprocess.run(["ls", "/usr/lib"], capture_output=True, text=True).returncode)
        # a program Debian links through /etc/alternatives, as python3-numpy's BLAS is
        print(subprocess.run(["awk", "BEGIN{print 6*7}"], capture_output=True).stdout)
        for path in ["/usr/share/doc", "/usr/share/common-licenses", "/usr/include",
                     "/usr/src", "/usr/sbin", "/usr/lib/apt", "/usr/lib/os-release"]:
            print("EXISTS" if os.path.lexists(path) else "hidden", path)
    """)
    lines = result.stdout.splitlines()
    assert lines[:4] == ["2:00:00 UTF-8", "42", "0", "b'42\\n'"], result
    assert [line.split()[0] for line in lines[4:]] == ["hidden"] * 7, result


def test_cannot_write_outside_its_working_directory(tmp_path):
    targets = [
        "/usr/escape",
        "/usr/lib/escape",
        "/escape",
        "/bin/escape",
        str(tmp_path / "escape"),
        "/proc/sys/kernel/hostname",
        "/dev/escape",  # bwrap's own /dev tmpfs, as large as half the RAM
    ]
    result, _ = run(f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as exc:
                print("blocked", type(exc).__name__)
        open("inside.txt", "w").write("ok")
    """)
    assert result.stdout.count("blocked") == len(targets), result
    assert [f.path for f in result.files] == ["inside.txt"]
    assert not (tmp_path / "escape").exists() and not Path("/usr/escape").exists()


def test_a_fork_bomb_is_contained():
    """The bomb reaches the process limit within milliseconds of its start, and then forks
    in vain until the wall clock ends it: 2 s leave its start (the sleeping run below shows
    one within 1 s) a margin, and the output shows that it did start."""
    result, label = run(
        """
        import os
        print("forking", flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """,
        replace(FAST, wall_seconds=2),
    )
    assert result.stdout.startswith("forking\n"), result
    assert result.timed_out or result.exit_code != 0
    assert wait_until_gone(label) == []


def test_allocating_10_gib_fails():
    result, _ = run("block = bytearray(10 << 30)\nprint('ALLOCATED')\n")
    assert result.exit_code == 1 and "MemoryError" in result.stderr
    assert "ALLOCATED" not in result.stdout


def test_the_out_of_memory_killer_ends_the_run_before_the_server():
    """RLIMIT_AS bounds each process, not the run (32 of 1 GiB outgrow the host): when
    memory runs out, the kernel ends a sandboxed process first, and the code cannot lower
    its own score, nor its children's."""
    result, _ = run("""
        import os
        if os.fork() == 0:
            os._exit(0 if open("/proc/self/oom_score_adj").read() == "1000\\n" else 1)
        print("child", os.waitstatus_to_exitcode(os.wait()[1]))
        print("score", open("/proc/self/oom_score_adj").read().strip())
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
            print("LOWERED")
        except OSError as exc:
            print("refused", exc.errno)
    """)
    assert result.stdout == "child 0\nscore 1000\nrefused 30\n", result  # EROFS


def test_an_infinite_loop_ends_at_its_cpu_limit():
    result, _ = run("while True:\n    pass\n", replace(FAST, cpu_seconds=1))
    assert result.exit_code == -signal.SIGXCPU and not result.timed_out


def test_a_sleeping_run_ends_at_its_wall_clock_limit():
    result, _ = run(
        "import time\nprint('started', flush=True)\ntime.sleep(60)\n", replace(FAST, wall_seconds=1)
    )
    assert result.timed_out and result.exit_code is None
    assert result.stdout == "started\n"


def test_100_mb_of_output_is_capped_and_stops_the_run():
    result, _ = run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n")
    assert result.output_truncated and result.exit_code is None
    assert len(result.stdout) == FAST.output_bytes


def test_output_cut_at_the_cap_ends_on_a_whole_character():
    """CJK and emoji output over the cap keeps whole characters only: no U+FFFD stands
    for the part of a character that was cut off."""
    code = "import sys\nfor _ in range(1 << 14):\n    sys.stdout.write('日本語 🙂 é ')\n"
    result, _ = run(code)
    assert result.output_truncated
    assert "\ufffd" not in result.stdout
    assert ("日本語 🙂 é " * (1 << 14)).startswith(result.stdout)
    assert FAST.output_bytes - 4 < len(result.stdout.encode()) <= FAST.output_bytes


@given(
    text=st.text(st.characters(codec="utf-8"), max_size=40),
    splits=st.lists(st.integers(0, 200), max_size=4),
    limit=st.integers(0, 120),
    on_stderr=st.booleans(),
)
def test_kept_output_is_a_prefix_of_whole_characters(text, splits, limit, on_stderr):
    """However the pipe splits the bytes and wherever the cap falls, what is kept reads as
    the start of what was written, with no U+FFFD that was not in it."""
    data = text.encode()
    output = _Output(limit)
    buffer = output.stderr if on_stderr else output.stdout
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *sorted(splits), len(data)])]
    for piece in pieces:
        if not output.add(buffer, piece):
            break
    result = _result(0, b"", output, False, 0.0)
    kept = result.stderr if on_stderr else result.stdout
    assert text.startswith(kept)
    assert output.truncated == (len(data) > limit)
    assert len(kept.encode()) > min(len(data), limit) - 4


def test_killing_its_parent_or_the_host_only_ends_the_run():
    result, _ = run(f"""
        import os, signal
        for pid in ({os.getpid()}, {os.getppid()}):
            try:
                os.kill(pid, signal.SIGKILL)
                print("KILLED", pid)
            except OSError as exc:
                print("blocked", type(exc).__name__)
        os.kill(-1, signal.SIGKILL)
        os.kill(os.getppid(), signal.SIGKILL)
    """)
    # The host's pids do not exist in the sandbox's PID namespace (a pid that happens to
    # exist there belongs to the sandbox itself).
    assert "KILLED" not in result.stdout.replace(f"KILLED {os.getppid()}", "")
    assert host_can_spawn()
    again, _ = run("print('still works')")
    assert again.stdout == "still works\n"


def test_a_run_cannot_see_another_runs_files():
    """The reader looks while the writer's file exists: it starts once the writer has
    written (a process the writer forks then names itself, which the host sees), and the
    writer ends only when the host kills that process, after the reader's look."""
    writer_label = uuid.uuid4().hex

    async def both():
        sandbox = Sandbox()
        writer = asyncio.create_task(
            sandbox.run(
                textwrap.dedent("""
                import ctypes, os, time
                open("secret.txt", "w").write("RUN-A-SECRET")
                if os.fork() == 0:
                    ctypes.CDLL(None).prctl(15, b"written")  # PR_SET_NAME
                    time.sleep(60)
                os.wait()
            """),
                FAST,
                label=writer_label,
            )
        )
        while (written := _pid_named(writer_label, "written")) is None:
            await asyncio.sleep(0.02)
        reader = await sandbox.run(
            textwrap.dedent("""
            import os
            found = []
            for root in ("/work", "/tmp"):
                for folder, _, names in os.walk(root):
                    found += [os.path.join(folder, n) for n in names]
            print(found)
        """),
            FAST,
        )
        os.kill(written, signal.SIGKILL)
        return await writer, reader

    first, second = asyncio.run(asyncio.wait_for(both(), 60))
    assert [f.path for f in first.files] == ["secret.txt"]
    assert second.stdout == "[]\n"
    later, _ = run("import os\nprint(os.listdir('.'))")
    assert later.stdout == "[]\n"


def _pid_named(label: str, name: str) -> int | None:
    """The host pid of the run's process that named itself `name` (PR_SET_NAME)."""
    for pid in running_pids(label):
        with contextlib.suppress(OSError):  # gone meanwhile
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
    return None


def test_cancelling_the_run_kills_its_process_tree():
    label = uuid.uuid4().hex

    async def cancel_midway():
        task = asyncio.create_task(
            Sandbox().run(
                "import os, time\nos.fork()\nprint('up', flush=True)\ntime.sleep(60)\n",
                FAST,
                label=label,
            )
        )
        while len(wait_until_gone(label, 0)) < 3:  # bwrap, its init, the launcher
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancel_midway(), 60))
    assert wait_until_gone(label) == []


def _priorities(label: str) -> list[tuple[str, str]]:
    """(task nice, autogroup nice) of each process of the run."""
    seen = []
    for pid in running_pids(label):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seen.append((stat[16], Path(f"/proc/{pid}/autogroup").read_text().split()[-1]))
        except OSError:  # gone meanwhile
            pass
    return seen


def test_the_code_runs_at_the_lowest_cpu_priority():
    label = uuid.uuid4().hex

    async def look():
        task = asyncio.create_task(
            Sandbox().run("import time\ntime.sleep(30)", replace(FAST, nice=19), label=label)
        )
        while ("19", "19") not in (seen := _priorities(label)):
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen

    seen = asyncio.run(asyncio.wait_for(look(), 60))
    # The code at nice 19, and the run's whole session (bwrap, its init, the launcher, the
    # code) in an autogroup at nice 19: a session is an autogroup, which competes with
    # the server's as an equal whatever the nice values of its tasks.
    assert [group for _, group in seen] == ["19"] * len(seen) and len(seen) >= 4, seen


def test_the_code_cannot_leave_its_priority_group():
    result, _ = run("""
        import os
        try:
            os.setsid()
            print("NEW SESSION")
        except OSError as exc:
            print("blocked", exc.errno)
    """)
    assert result.stdout == "blocked 1\n", result


def test_without_bubblewrap_the_sandbox_refuses_to_run():
    sandbox = Sandbox(bwrap="/nonexistent/bwrap")
    assert "bubblewrap" in sandbox.unavailable_reason()
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        asyncio.run(sandbox.run("print(1)"))
