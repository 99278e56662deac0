"""The Python sandbox: hostile snippets are contained and the host keeps working (docs/SANDBOX.md).

Each snippet tries an attack and prints ESCAPED if it worked; every test then checks the host:
a marker process is alive, the host can fork, a file outside is untouched, and no process of a
sandbox uid is left behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lmforge.tools import sandbox
from lmforge.tools.sandbox import SandboxUnavailable, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux namespaces")

UID_BASE = 1_500_000_000


def _sandbox_processes() -> list[str]:
    """Host processes that belong to a sandbox (its uid) or run its bootstrap."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if uid >= UID_BASE or "/tmp/main.py" in cmd or "MARKER-" in cmd:
            found.append(f"{d.name} uid={uid} {cmd[:80]}")
    return found


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things on the host that the sandbox must not reach: a process, files, listeners."""
    tmp = tmp_path_factory.mktemp("host")
    secret = tmp / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    outside = tmp / "outside.txt"
    outside.write_text("untouched")
    marker = subprocess.Popen(["sleep", "600"])
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.01)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.01)
    abstract_name = f"lmforge-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen(8)
    abstract.settimeout(0.01)
    unix_path = str(tmp / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(8)
    unix.settimeout(0.01)
    os.environ["LMFORGE_TEST_SECRET"] = "ENV-SECRET-77"
    ctx = {
        "tmp": tmp, "secret": str(secret), "outside": str(outside), "marker_pid": marker.pid,
        "port": tcp.getsockname()[1], "udp_port": udp.getsockname()[1], "abstract": abstract_name,
        "unix_path": unix_path, "repo": str(Path(__file__).resolve().parents[1]),
        "listeners": [tcp, abstract, unix], "udp": udp, "marker": marker,
    }
    yield ctx
    os.environ.pop("LMFORGE_TEST_SECRET", None)
    marker.kill()
    marker.wait()
    for s in (tcp, udp, abstract, unix):
        s.close()


def _listeners_untouched(ctx):
    for s in ctx["listeners"]:
        with pytest.raises((socket.timeout, BlockingIOError)):
            conn, _ = s.accept()
            conn.close()
    with pytest.raises((socket.timeout, BlockingIOError)):
        ctx["udp"].recvfrom(100)


def assert_host_ok(ctx):
    assert ctx["marker"].poll() is None, "the host marker process was killed"
    assert subprocess.run(["true"]).returncode == 0, "the host cannot fork any more"
    assert Path(ctx["outside"]).read_text() == "untouched"
    assert Path(ctx["secret"]).read_text() == "TOP-SECRET-42"
    leftover = _sandbox_processes()
    assert not leftover, f"sandbox processes outlived the call: {leftover}"
    _listeners_untouched(ctx)


def ok(cond, r):
    assert cond, str(r)[:800]


def blocked(r, *expect):
    """The snippet printed no ESCAPED and every expected word."""
    out = r.stdout + r.stderr
    assert "ESCAPED" not in out, out
    for e in expect:
        assert e in out, out


# (name, code, run_python kwargs, check(result))
CASES = [
    ("fork_bomb", """
        import os
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    import time; time.sleep(60)
                n += 1
        except OSError as e:
            print("BLOCKED after", n, e)
        if n > 20: print("ESCAPED")
        """, {}, lambda r: blocked(r, "BLOCKED", "Resource temporarily unavailable")),
    ("shell_fork_bomb", """
        import subprocess
        p = subprocess.run(["/bin/sh", "-c", "f() {{ f | f & }}; f; sleep 2"], capture_output=True, text=True, timeout=20)
        print("DONE", p.returncode)
        """, {"timeout_s": 6}, lambda r: blocked(r)),
    ("thread_bomb", """
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); n += 1
        except RuntimeError as e:
            print("BLOCKED after", n, e)
        if n > 20: print("ESCAPED")
        """, {}, lambda r: blocked(r, "BLOCKED", "can't start new thread")),
    ("memory_bomb_one_block", "x = bytearray(10 ** 10)\nprint('ESCAPED')", {},
     lambda r: (blocked(r, "MemoryError"), ok(r.killed_reason == "memory limit (MemoryError)", r))),
    ("memory_bomb_growing", """
        chunks = []
        try:
            while True:
                chunks.append(b"x" * 2 ** 24)
        except MemoryError:
            print("BLOCKED at", len(chunks) * 16, "MB")
        if len(chunks) * 16 > 400: print("ESCAPED")
        """, {"memory_mb": 256}, lambda r: blocked(r, "BLOCKED")),
    ("memory_bomb_in_children", """
        import os
        pids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    x = bytearray(2 ** 30)
                    os._exit(3)
                except MemoryError:
                    os._exit(7)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        print("children", codes)
        if 3 in codes: print("ESCAPED")
        """, {}, lambda r: blocked(r, "children [7, 7, 7, 7]")),
    ("infinite_loop", "while True: pass", {"timeout_s": 1.0},
     lambda r: ok(r.timed_out and r.exit_code is None, r)),
    ("cpu_limit", "while True: pass", {"timeout_s": 30, "cpu_s": 1},
     lambda r: ok(r.killed_reason == "cpu time limit" and not r.timed_out and r.exit_code == -signal.SIGXCPU, r)),
    ("sleep_ignoring_sigterm", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("sleeping", flush=True)
        time.sleep(100)
        """, {"timeout_s": 2.0}, lambda r: ok(r.timed_out and r.stdout == "sleeping\n", r)),
    ("daemon_outlives_call", """
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # MARKER-daemon"])
            os._exit(0)
        print("parent leaves the daemon behind")
        """, {}, lambda r: blocked(r, "parent leaves")),
    ("daemon_via_subprocess", """
        import subprocess
        subprocess.Popen(["sleep", "60"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.Popen(["/bin/sh", "-c", "nohup sleep 60 >/dev/null 2>&1 &"])
        print("started")
        """, {}, lambda r: blocked(r, "started")),
    ("tcp_to_host_loopback", """
        import socket
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("ESCAPED")
        except OSError as e:
            print("BLOCKED", e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("tcp_to_localhost_name_and_ipv6", """
        import socket
        for host in ("localhost", "::1", "10.0.2.2", "8.8.8.8"):
            try:
                socket.create_connection((host, {port}), timeout=1)
                print("ESCAPED", host)
            except OSError as e:
                print("BLOCKED", host, e)
        """, {}, lambda r: blocked(r, "BLOCKED ::1", "BLOCKED 8.8.8.8")),
    ("udp_to_host", """
        import socket
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"leak", ("127.0.0.1", {udp_port}))
            print("sent?")
        except OSError as e:
            print("BLOCKED", e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("raw_and_netlink_sockets", """
        import socket
        for fam, typ in ((socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_NETLINK, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW)):
            try:
                socket.socket(fam, typ); print("ESCAPED", fam)
            except OSError as e:
                print("BLOCKED", fam, e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("abstract_unix_socket_of_host", """
        import socket
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect("\\0{abstract}"); print("ESCAPED")
        except OSError as e:
            print("BLOCKED", e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("unix_socket_file_of_host", """
        import socket
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect("{unix_path}"); print("ESCAPED")
        except OSError as e:
            print("BLOCKED", e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("dns_lookup", """
        import socket
        try:
            print("ESCAPED", socket.getaddrinfo("pypi.org", 443))
        except OSError as e:
            print("BLOCKED", e)
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("read_etc_shadow", """
        for p in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh/ssh_host_rsa_key"):
            try:
                print("ESCAPED", p, open(p).read()[:20])
            except OSError as e:
                print("BLOCKED", p, type(e).__name__)
        """, {}, lambda r: blocked(r, "BLOCKED /etc/shadow")),
    ("read_home_and_ssh", """
        import os, glob
        for p in ("/root/.ssh", os.path.expanduser("~/.ssh"), "/root/.bash_history", "/root/.cache"):
            if os.path.exists(p): print("ESCAPED", p)
        homes = glob.glob("/home/*")
        if homes: print("ESCAPED", homes)
        print("root holds", sorted(os.listdir("/root")) if os.path.isdir("/root") else None)
        """, {}, lambda r: blocked(r, "root holds")),
    ("read_secret_file_and_repo", """
        import os
        for p in ("{secret}", "{repo}/pyproject.toml", "/work"):
            if os.path.exists(p): print("ESCAPED", p)
        print("BLOCKED")
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("caller_environment", """
        import os, glob
        if "ENV-SECRET-77" in repr(dict(os.environ)): print("ESCAPED env")
        for p in glob.glob("/proc/*/environ"):
            try:
                if b"ENV-SECRET-77" in open(p, "rb").read(): print("ESCAPED", p)
            except OSError:
                pass
        print("BLOCKED")
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("proc_of_other_processes", """
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print("pids", pids)
        if str({marker_pid}) in pids and {marker_pid} > 10: print("ESCAPED")
        for f in ("/proc/kcore", "/proc/sysrq-trigger", "/proc/kallsyms", "/sys/kernel"):
            if os.path.exists(f): print("ESCAPED", f)
        """, {}, lambda r: blocked(r, "pids")),
    ("write_outside", """
        import os
        for p in ("{outside}", "/usr/lib/evil", "/etc/evil", "/evil", "/root/evil", "/proc/evil", "/dev/evil"):
            try:
                open(p, "w").write("pwned"); print("ESCAPED", p)
            except OSError as e:
                print("BLOCKED", p, type(e).__name__)
        """, {}, lambda r: blocked(r, "BLOCKED /usr/lib/evil", "BLOCKED /evil")),
    ("symlink_and_dotdot_escape", """
        import os
        os.symlink("{outside}", "/tmp/link")
        os.symlink("/etc/shadow", "/tmp/shadow")
        for p in ("/tmp/link", "/tmp/shadow", "/tmp/../../../../{outside}", "/proc/self/root{outside}", "/proc/1/root/etc/shadow"):
            try:
                open(p, "a").write("pwned"); print("ESCAPED", p)
            except OSError as e:
                print("BLOCKED", p, type(e).__name__)
        """, {}, lambda r: blocked(r, "BLOCKED /tmp/link")),
    ("kill_parent_and_init", """
        import os, signal
        for pid in (os.getppid(), 1):
            for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):
                try:
                    os.kill(pid, sig)
                except OSError as e:
                    pass
        print("still here")
        """, {}, lambda r: blocked(r, "still here")),
    ("kill_every_process", """
        import os, signal
        try:
            os.kill({marker_pid}, signal.SIGKILL); print("ESCAPED? pid exists here")
        except OSError as e:
            print("BLOCKED", e)
        if os.fork() == 0:
            os.kill(-1, signal.SIGKILL)
            os._exit(0)
        os.wait()
        print("survived kill -1")
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("raise_own_limits", """
        import resource
        for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
            res = getattr(resource, name)
            soft, hard = resource.getrlimit(res)
            try:
                resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print("ESCAPED", name)
            except (ValueError, OSError) as e:
                print("BLOCKED", name, soft, hard)
        """, {}, lambda r: blocked(r, "BLOCKED RLIMIT_NPROC 16 16", "BLOCKED RLIMIT_AS")),
    ("become_root", """
        import os
        for f in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0]), lambda: os.seteuid(0)):
            try:
                f(); print("ESCAPED", os.getuid())
            except OSError as e:
                print("BLOCKED", e)
        caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0]
        print(caps.strip())
        if caps.split()[1].strip("0"): print("ESCAPED caps")
        # setuid binaries (su, passwd) cannot raise privileges: /usr is nosuid and no_new_privs is set
        print("nosuid", bool(os.statvfs("/usr").f_flag & os.ST_NOSUID))
        print([l.strip() for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0])
        """, {}, lambda r: blocked(r, "BLOCKED", "CapEff:\t0000000000000000", "nosuid True", "NoNewPrivs:\t1")),
    ("new_namespaces", """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        for flag in (0x10000000, 0x00020000, 0x40000000, 0x20000000):
            if libc.unshare(flag) == 0: print("ESCAPED unshare", hex(flag))
            else: print("BLOCKED unshare", hex(flag), os.strerror(ctypes.get_errno()))
        import subprocess
        p = subprocess.run(["unshare", "-Ur", "id"], capture_output=True, text=True)
        if p.returncode == 0: print("ESCAPED", p.stdout)
        """, {}, lambda r: blocked(r, "BLOCKED unshare 0x10000000")),
    ("mount_chroot_ptrace", """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0: print("ESCAPED mount")
        try:
            os.chroot("/tmp"); print("ESCAPED chroot")
        except OSError as e:
            print("BLOCKED chroot", e)
        PTRACE_ATTACH = 16
        if libc.ptrace(PTRACE_ATTACH, 1, 0, 0) == 0: print("ESCAPED ptrace")
        else: print("BLOCKED ptrace", os.strerror(ctypes.get_errno()))
        if libc.syscall(321, 0, 0, 0) == 0: print("ESCAPED bpf")
        """, {}, lambda r: blocked(r, "BLOCKED chroot", "BLOCKED ptrace")),
    ("device_nodes", """
        import os
        try:
            os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0)); print("ESCAPED mknod")
        except OSError as e:
            print("BLOCKED mknod", e)
        print(sorted(os.listdir("/dev")))
        if os.path.exists("/dev/sda") or os.path.exists("/dev/vda") or os.path.exists("/dev/mem"): print("ESCAPED dev")
        """, {}, lambda r: blocked(r, "BLOCKED mknod")),
    ("huge_stdout", "while True: print('x' * 1000)", {"max_output_bytes": 10_000},
     lambda r: ok(r.truncated and len(r.stdout) < 10_100 and r.killed_reason == "output limit (10000 bytes)", r)),
    ("huge_stderr_one_write", "import sys\nsys.stderr.write('e' * 10**7)", {"max_output_bytes": 10_000},
     lambda r: ok(r.truncated and len(r.stderr) <= 10_000, r)),
    ("disk_filling", """
        n = 0
        try:
            with open("big", "wb") as f:
                while True:
                    f.write(b"x" * 2 ** 20); f.flush(); n += 1
        except OSError as e:
            print("BLOCKED at", n, "MB", e)
        if n > 40: print("ESCAPED")
        """, {"disk_mb": 32}, lambda r: blocked(r, "BLOCKED")),
    ("inode_filling", """
        import os
        n = 0
        try:
            while True:
                open(f"f{{n}}", "w").close(); n += 1
        except OSError as e:
            print("BLOCKED at", n, e)
        if n > 5000: print("ESCAPED")
        """, {}, lambda r: blocked(r, "BLOCKED")),
    ("fd_exhaustion", """
        fds = []
        try:
            while True:
                fds.append(open("/dev/null"))
        except OSError as e:
            print("BLOCKED at", len(fds), e)
        """, {}, lambda r: blocked(r, "BLOCKED", "Too many open files")),
    ("stdin_does_not_block", "print(input())", {"timeout_s": 5},
     lambda r: ok("EOFError" in r.stderr and not r.timed_out, r)),
]


@pytest.mark.parametrize("name,code,kwargs,check", CASES, ids=[c[0] for c in CASES])
def test_hostile_snippet_is_contained(host, name, code, kwargs, check):
    code = textwrap.dedent(code).format(**{k: v for k, v in host.items() if isinstance(v, (str, int))})
    kwargs = {"timeout_s": 5, **kwargs}
    start = time.monotonic()
    r = run_python(code, **kwargs)
    elapsed = time.monotonic() - start
    check(r)
    # every call ends within its wall-clock limit plus a margin for the kill and teardown
    assert elapsed < kwargs["timeout_s"] + 5, elapsed
    assert_host_ok(host)


def test_hostile_suite_is_large_enough():
    assert len(CASES) >= 30


def test_normal_programs_work(host):
    r = run_python("import math, json, fractions, re, collections, decimal, itertools, sqlite3\n"
                   "print(math.factorial(20), json.dumps({'a': 1}))\nprint('привет')")
    assert r.ok, r
    assert r.stdout == "2432902008176640000 {\"a\": 1}\nпривет\n"
    r = run_python("import sys\nprint('to err', file=sys.stderr)\nsys.exit(3)")
    assert r.exit_code == 3 and r.stderr == "to err\n" and r.killed_reason is None
    r = run_python("exit(4)")  # exit/quit exist even without the site module
    assert r.exit_code == 4
    lib = host["tmp"] / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "helper_mod.py").write_text("VALUE = 41\n")
    r = run_python(f"import sys\nsys.path.insert(0, {str(lib)!r})\nimport helper_mod\nprint(helper_mod.VALUE + 1)\n"
                   f"open({str(lib / 'x')!r}, 'w')", ro_paths=[str(lib)])  # visible, read-only
    assert r.stdout == "42\n" and "Read-only file system" in r.stderr, r
    assert not (lib / "x").exists()
    r = run_python("def f(x):\n    return x * x\nimport multiprocessing as mp\n"
                   "with mp.Pool(2) as p:\n    print(p.map(f, range(5)))")
    assert r.stdout == "[0, 1, 4, 9, 16]\n", r
    assert_host_ok(host)


def test_tracebacks_point_at_user_code():
    r = run_python("x = 1\ndef g():\n    return 1 / 0\ng()\n")
    assert r.exit_code == 1
    assert r.stderr.startswith("Traceback (most recent call last):\n  File \"/tmp/main.py\", line 4"), r.stderr
    assert "ZeroDivisionError" in r.stderr and "<string>" not in r.stderr
    r = run_python("def f(:\n  pass\n")
    assert "SyntaxError" in r.stderr and "line 1" in r.stderr


def test_output_printed_before_timeout_is_kept():
    r = run_python("print('partial')\nimport time\ntime.sleep(30)", timeout_s=2)
    assert r.timed_out and r.stdout == "partial\n" and r.exit_code is None


def test_concurrent_sandboxes_are_independent(host):
    results = {}

    def go(i):
        results[i] = run_python(f"import os\nprint({i}, os.getuid())")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = set()
    for i, r in results.items():
        assert r.ok and r.stdout.split()[0] == str(i)
        uids.add(r.stdout.split()[1])
    if os.geteuid() == 0:
        assert len(uids) == 3  # a fresh uid per sandbox: no shared process count
    assert_host_ok(host)


def test_caller_killed_mid_run_leaves_nothing(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(
        "from lmforge.tools.sandbox import run_python\n"
        "run_python('import time; print(1, flush=True); time.sleep(60)  # MARKER-caller', timeout_s=60)\n"
    )
    caller = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 20
        while len(_sandbox_processes()) < 2:  # its init and the program
            assert time.monotonic() < deadline, "the sandbox never started"
            time.sleep(0.05)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    deadline = time.monotonic() + 5
    while _sandbox_processes():
        assert time.monotonic() < deadline, _sandbox_processes()
        time.sleep(0.05)


def test_refuses_to_run_without_namespaces(tmp_path):
    """Where namespaces are denied (here: by a seccomp filter around the caller), nothing runs."""
    flag = tmp_path / "ran"
    script = tmp_path / "denied.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os, sys
        sys.path.insert(0, {str(Path(sandbox.__file__).parent)!r})
        import _sandbox_launcher as L
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, needed to install a filter
        L.install_seccomp(os.uname().machine)   # denies unshare/mount for this process tree
        from lmforge.tools.sandbox import run_python, SandboxUnavailable
        try:
            run_python("open({str(flag)!r}, 'w').write('x')")
            print("RAN")
        except SandboxUnavailable as e:
            print("REFUSED", e)
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert "REFUSED sandbox unavailable" in p.stdout, p.stdout + p.stderr
    assert not flag.exists()


def test_refuses_on_other_platforms(monkeypatch):
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    with pytest.raises(SandboxUnavailable, match="Linux"):
        run_python("print(1)")


def test_python_tool_text():
    r = sandbox.python_tool("print(6 * 7)")
    assert r.text == "42" and r.figures == []  # figures: tests/test_tools_figures.py
    out = sandbox.python_tool("print('a')\nraise ValueError('bad')").text
    assert out.startswith("a\nstderr:\nTraceback") and "ValueError: bad" in out and "[exit code 1]" in out
    assert "[stopped: wall-clock timeout" in sandbox.python_tool("while True: pass", timeout_s=0.5).text


UNPRIVILEGED = r"""
import json, os
from lmforge.tools.sandbox import run_python
code = '''
import os, socket
out = {"uid": os.getuid(), "pids": len([p for p in os.listdir("/proc") if p.isdigit()])}
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1); out["net"] = True
except OSError:
    out["net"] = False
try:
    open("/usr/escape", "w"); out["write"] = True
except OSError:
    out["write"] = False
import matplotlib.pyplot as plt
plt.plot([1, 2, 3])
print(out)
'''
r = run_python(code, timeout_s=60, figures=True)
print(json.dumps({"euid": os.geteuid(), "ok": r.ok, "stdout": r.stdout, "stderr": r.stderr[-500:],
                  "figures": [[f.width, f.height] for f in r.figures]}))
"""


def test_an_unprivileged_user_gets_the_same_sandbox(tmp_path):
    """Run as a user without privileges (a user namespace maps this process to nobody, so the
    sandbox takes its own unprivileged path: a user namespace of its own instead of a fresh
    uid): no network, a read-only root, its own process table, and figures still come back."""
    import ast
    import json
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to drop privileges with")
    probe = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not available here: {probe.stderr.decode().strip()}")
    res = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c", UNPRIVILEGED],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["euid"] == 65534 and got["ok"], got
    inside = ast.literal_eval(got["stdout"].strip())
    assert inside["net"] is False and inside["write"] is False and inside["pids"] <= 3, inside
    assert got["figures"] == [[640, 480]]
