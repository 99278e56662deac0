"""Run untrusted Python isolated by the operating system (threat model: docs/SANDBOX.md).

    from lmforge.tools.sandbox import run_python
    r = run_python("print(2 ** 100)", timeout_s=5)
    r.stdout, r.stderr, r.exit_code, r.timed_out, r.killed_reason

Each call starts a fresh sandbox (about 0.1 s): new PID, mount, network, IPC and UTS namespaces;
a throwaway root holding only a read-only view of the Python install, /usr and a few device
nodes; a private size-limited /tmp as the working directory; an unprivileged uid with no
capabilities; rlimits (CPU, address space, processes, file size, open files); a seccomp filter;
a wall-clock limit that kills the whole PID namespace; output cut at a size limit. Nothing the
code starts outlives the call. The work is done by `_sandbox_launcher.py`, a separate
standard-library-only process, so the caller (which may hold threads, torch, a server loop)
never forks with user code in it.

Where this isolation cannot be set up (no namespaces, an unknown architecture), `run_python`
raises `SandboxUnavailable` instead of running anything less isolated.

Figures (`run_python(code, figures=True)`, what the `python` tool uses): numpy and matplotlib
become importable (their site-packages folder, read-only) with the Agg backend; when the program
ends, every figure still open is saved as PNG, or, when the program saved PNG files into /tmp
itself, those are taken instead. The sandbox's init hands back at most MAX_FIGURES regular files of
at most MAX_FIGURE_BYTES each, and nothing else; here each one is decoded with Pillow (PNG only,
at most MAX_FIGURE_SIDE pixels a side) and encoded again, so only pixels leave the sandbox.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.errors import LmforgeError

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
# The program's interpreter: isolated (no env vars, no user site), no site module (its .pth
# files cost up to 0.2 s per start and bring in site-packages), no .pyc writes, unbuffered (output
# printed before a timeout kill is kept), UTF-8 I/O whatever the locale. A two-line bootstrap
# gives back what `site` would (exit/quit) and runs /tmp/main.py in __main__ with a traceback
# that starts at the user's code.
BOOTSTRAP = (
    "import sys, builtins as b; b.exit = b.quit = sys.exit; del b; __file__ = '/tmp/main.py'; sys.argv = [__file__]\n"
    "try: exec(compile(open(__file__, 'rb').read(), __file__, 'exec'))\n"
    "except SystemExit: raise\n"
    "except BaseException as e: e = e.with_traceback(e.__traceback__.tb_next); sys.excepthook(type(e), e, e.__traceback__); sys.exit(1)\n"
)
PYTHON_ARGS = ["-I", "-S", "-B", "-u", "-X", "utf8", "-c", BOOTSTRAP]
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "USER": "sandbox",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per thread arena otherwise
}
# With figures: the plotting stack without a display; one BLAS/OpenMP thread, as the process
# limit counts threads and OpenBLAS would start one per core at import.
FIGURE_ENV = {"MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FIGURE_PACKAGES = ("numpy", "matplotlib")
MAX_FIGURES = 4
MAX_FIGURE_BYTES = 1 << 20
FIGURE_DPI, FIGURE_SIDE = 100, 2000  # open figures are saved at most this DPI and pixels a side
MAX_FIGURE_SIDE = 2048  # pixels a side the host accepts (room for matplotlib's rounding)
FIGURE_DIR = "/tmp/.lmforge-figures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Runs after the program (in its process, so the program could change it: it is a convenience,
# not a boundary; the boundary is what init hands back and what _checked_png accepts).
FIGURE_EPILOGUE = f"""
def _lmforge_save_figures():
    import os, sys
    plt = sys.modules.get('matplotlib.pyplot')
    if plt is None or any(n.lower().endswith('.png') for n in os.listdir('/tmp')):
        return  # nothing drawn, or the program saved its own PNGs (those are taken)
    os.makedirs({FIGURE_DIR!r}, exist_ok=True)
    for k, num in enumerate(plt.get_fignums()[:{MAX_FIGURES}]):
        try:
            fig = plt.figure(num)
            dpi = min(fig.dpi, {FIGURE_DPI}, {FIGURE_SIDE} / max(max(fig.get_size_inches()), 0.01))
            fig.savefig(f'{FIGURE_DIR}/figure-{{k + 1}}.png', dpi=dpi, format='png')
        except Exception as e:
            print(f'[figure {{k + 1}} could not be saved: {{type(e).__name__}}: {{e}}]', file=sys.stderr)
"""
FIGURE_BOOTSTRAP = (
    "import os, sys, builtins as b; b.exit = b.quit = sys.exit; del b; __file__ = '/tmp/main.py'; sys.argv = [__file__]\n"
    "sys.path += [p for p in os.environ.pop('LMFORGE_PATH', '').split(':') if p]\n"
    + FIGURE_EPILOGUE +
    "try:\n"
    "    try: exec(compile(open(__file__, 'rb').read(), __file__, 'exec'))\n"
    "    except SystemExit: raise\n"
    "    except BaseException as e: e = e.with_traceback(e.__traceback__.tb_next); sys.excepthook(type(e), e, e.__traceback__); sys.exit(1)\n"
    "finally:\n"
    "    _lmforge_save_figures()\n"
)
DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
SIGNAL_REASONS = {
    signal.SIGXCPU: "cpu time limit",
    signal.SIGXFSZ: "file size limit",
    signal.SIGKILL: "killed by SIGKILL (CPU hard limit or out of memory)",
}


class SandboxUnavailable(LmforgeError):
    """This machine cannot give the isolation run_python promises; nothing was run."""


@dataclasses.dataclass
class Figure:
    """A PNG the program drew, decoded and encoded again here (only its pixels came out)."""

    png: bytes
    width: int
    height: int

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def as_dict(self) -> dict:
        """The JSON form that tool messages carry in their `figures` field."""
        return {"mime_type": "image/png", "width": self.width, "height": self.height, "url": self.data_url()}


@dataclasses.dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # the program's exit status; -N when a signal N ended it
    timed_out: bool = False
    killed_reason: str | None = None  # why the sandbox stopped the program, None if it ended itself
    truncated: bool = False  # output was cut at max_output_bytes
    duration_s: float = 0.0
    figures: list[Figure] = dataclasses.field(default_factory=list)  # with figures=True
    figure_notes: list[str] = dataclasses.field(default_factory=list)  # what was refused, and why

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@functools.lru_cache(maxsize=8)
def _fs_plan(python: str, extra_ro: tuple[str, ...]) -> dict:
    """What the sandbox sees: read-only /usr, the Python install, a few /etc files, devices."""
    binds: list[str] = []
    symlinks: list[tuple[str, str]] = []
    if os.path.isdir("/usr"):
        binds.append("/usr")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            symlinks.append((top, os.readlink(top)))  # merged-/usr systems: /lib -> usr/lib
        elif os.path.isdir(top):
            binds.append(top)
    prefix = os.path.realpath(sys.base_prefix)
    for path in (prefix, os.path.dirname(python), *extra_ro):
        path = os.path.realpath(path)
        if not os.path.exists(path):
            raise SandboxUnavailable(f"sandbox: read-only path {path} does not exist")
        if not _covered(path, binds):
            binds.append(path)
    copies = [(p, p) for p in ("/etc/ld.so.cache",) if os.path.isfile(p)]
    if os.path.islink("/etc/localtime"):
        symlinks.append(("/etc/localtime", os.readlink("/etc/localtime")))
    elif os.path.isfile("/etc/localtime"):
        copies.append(("/etc/localtime", "/etc/localtime"))
    files = {
        "/etc/passwd": "root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n",
        "/etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "/etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "/etc/hostname": "sandbox\n",
    }
    devices = [d for d in DEVICES if os.path.exists(d)]
    return {"ro_binds": binds, "symlinks": symlinks, "copies": copies, "files": files, "devices": devices}


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 256,
    cpu_s: float | None = None,
    max_processes: int = 16,
    max_output_bytes: int = 65536,
    disk_mb: int = 64,
    max_open_files: int = 256,
    ro_paths: tuple[str, ...] | list[str] = (),
    figures: bool = False,
) -> SandboxResult:
    """Run `code` as a script in a fresh sandbox and return what it printed and how it ended.

    memory_mb bounds each process's address space; max_processes counts processes and threads
    of the sandbox's user; disk_mb is the size of the private /tmp (also the largest file);
    cpu_s defaults to timeout_s. `ro_paths` adds host paths visible read-only (e.g. a
    site-packages folder). `figures`: numpy and matplotlib (Agg) importable, and the PNGs the
    program draws come back in `result.figures` (module docstring). Raises SandboxUnavailable
    when isolation cannot be set up.
    """
    if sys.platform != "linux":
        raise SandboxUnavailable("the Python sandbox needs Linux namespaces; this is " + sys.platform)
    python = os.path.realpath(sys.executable)
    cpu = max(1, int(cpu_s if cpu_s is not None else timeout_s + 0.999))
    mem = memory_mb * 2**20
    env, python_args, paths = ENV, PYTHON_ARGS, ()
    if figures:
        paths = _figure_paths()
        env = {**ENV, **FIGURE_ENV, "LMFORGE_PATH": ":".join(paths)}
        python_args = PYTHON_ARGS[:-1] + [FIGURE_BOOTSTRAP]
        # fontconfig's settings, so that matplotlib's font search (fc-list) finds /usr's fonts quietly
        paths += tuple(p for p in ("/etc/fonts",) if os.path.isdir(p))
    plan = dict(_fs_plan(python, tuple(ro_paths) + paths))
    plan.update(
        code=code,
        python=python,
        python_args=python_args,
        env=env,
        figures={"dir": FIGURE_DIR, "max": MAX_FIGURES, "max_bytes": MAX_FIGURE_BYTES} if figures else None,
        uid=None,
        tmp_bytes=disk_mb * 2**20,
        tmp_inodes=4096,
        rlimits={
            "cpu": [cpu, cpu + 1],  # SIGXCPU at the soft limit, SIGKILL one second later
            "as": mem,
            "nproc": max_processes,
            "fsize": disk_mb * 2**20,
            "nofile": max_open_files,
            "core": 0,
            "memlock": 0,
            "msgqueue": 0,
        },
    )
    root = tempfile.mkdtemp(prefix="lmforge-sbx-")
    plan["root"] = root
    try:
        return _launch(plan, timeout_s, max_output_bytes)
    finally:
        try:
            os.rmdir(root)  # the tmpfs was mounted over it only inside the sandbox's namespace
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def _figure_paths() -> tuple[str, ...]:
    """The folders (site-packages) holding numpy and matplotlib, put on the program's sys.path."""
    import importlib.util

    out: list[str] = []
    for name in FIGURE_PACKAGES:
        spec = importlib.util.find_spec(name)  # finds without importing
        if spec is None or not spec.submodule_search_locations:
            continue  # not installed: the program's import fails as it would anywhere
        root = os.path.dirname(os.path.realpath(next(iter(spec.submodule_search_locations))))
        if root not in out:
            out.append(root)
    return tuple(out)


def _checked_png(data: bytes) -> tuple[Figure | None, str | None]:
    """(the figure, None) when `data` is a PNG within the limits, else (None, why not).

    Decoded by Pillow's PNG reader only, dimensions checked before the pixels are read (a small
    file can hold a huge image), then encoded again: text chunks, extra data after the image or
    anything else a program might smuggle out in a "PNG" is dropped with the file.
    """
    try:
        from PIL import Image  # matplotlib's own dependency: there whenever figures can be drawn
    except ImportError:
        return None, "checking figures needs Pillow (pip install pillow)"
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None, "not a PNG file"
    w, h = struct.unpack(">II", data[16:24])  # the header's size, read before any decoder runs
    if not (0 < w <= MAX_FIGURE_SIDE and 0 < h <= MAX_FIGURE_SIDE):
        return None, f"{w}x{h} pixels, more than {MAX_FIGURE_SIDE} a side"
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size != (w, h):
                return None, "not a valid PNG (its size is not its header's)"
            im.load()
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                im = im.convert("RGBA")
            out = io.BytesIO()
            im.save(out, format="PNG")
    except Exception as e:  # noqa: BLE001 - whatever Pillow makes of a hostile file, it is refused
        return None, f"not a valid PNG ({type(e).__name__})"
    png = out.getvalue()
    if len(png) > MAX_FIGURE_BYTES:
        return None, f"larger than {MAX_FIGURE_BYTES // 2**20} MB"
    return Figure(png, w, h), None


def _figures_from(events: list[dict]) -> tuple[list[Figure], list[str]]:
    """The figures init handed back (checked here), and a note for each one refused or left out."""
    figures, notes = [], []
    for ev in events:
        if ev.get("event") == "figure":
            fig, why = (None, ev["skipped"]) if "skipped" in ev else _checked_png(base64.b64decode(ev["data"]))
            if fig is None:
                notes.append(f"[a figure was not shown: {why}]")
            else:
                figures.append(fig)
        elif ev.get("event") == "figures_left" and ev["count"]:
            notes.append(f"[{ev['count']} more figure(s) not shown: at most {MAX_FIGURES} per run]")
    return figures, notes


def _launch(plan: dict, timeout_s: float, max_output: int) -> SandboxResult:
    start = time.monotonic()
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [plan["python"], "-I", "-S", str(LAUNCHER), str(status_w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,  # its own process group: one killpg ends launcher and init
            # Nothing from the caller's environment (API keys...): the sandbox's init would
            # otherwise carry it in /proc/1/environ.
            env={"PATH": ENV["PATH"], "LANG": "C.UTF-8"},
        )
    finally:
        os.close(status_w)
    try:
        proc.stdin.write(json.dumps(plan).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    bufs = {"out": bytearray(), "err": bytearray(), "status": bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    status_file = os.fdopen(status_r, "rb", buffering=0)
    sel.register(status_file, selectors.EVENT_READ, "status")
    deadline = start + timeout_s
    killed_reason: str | None = None
    timed_out = truncated = False
    kill_time = None

    def kill(reason: str) -> None:
        nonlocal killed_reason, kill_time
        if killed_reason is None:
            killed_reason = reason
        kill_time = time.monotonic()
        init_pid = _init_pid(bufs["status"])
        try:
            if init_pid is not None:
                # Kill the sandbox's init: the kernel kills the rest of its PID namespace, and
                # the launcher reaps it and reports, so nothing is left behind, not even a zombie.
                os.kill(init_pid, signal.SIGKILL)
            else:  # too early to know init: the launcher's process group holds both
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        while sel.get_map():
            now = time.monotonic()
            if kill_time is None and now >= deadline:
                timed_out = True
                kill(f"wall-clock timeout ({timeout_s:g} s)")
            if kill_time is not None and now - kill_time > 5.0:
                break  # something still holds a pipe open after the kill: stop waiting
            wait = (deadline - now) if kill_time is None else 0.5
            for key, _ in sel.select(timeout=max(0.0, wait)):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                if key.data == "status":
                    buf += data
                    continue
                room = max_output - len(bufs["out"]) - len(bufs["err"])
                if len(data) > room:
                    buf += data[:max(room, 0)]
                    if not truncated:
                        truncated = True
                        kill(f"output limit ({max_output} bytes)")
                else:
                    buf += data
    finally:
        sel.close()
        for f in (proc.stdout, proc.stderr, status_file):
            f.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in bufs["status"].decode().splitlines() if line.strip()]
    for ev in events:
        if ev.get("event") == "error":
            raise SandboxUnavailable(ev["message"])
    if not any(ev.get("event") == "init" for ev in events) and killed_reason is None:
        tail = bufs["err"].decode(errors="replace").strip()[-500:]
        raise SandboxUnavailable(f"sandbox launcher failed (exit {proc.returncode}): {tail}")
    exit_code = None
    for ev in events:
        if ev.get("event") == "exit":
            exit_code = -ev["signal"] if "signal" in ev else ev["code"]
    stdout = bufs["out"].decode("utf-8", errors="replace")
    stderr = bufs["err"].decode("utf-8", errors="replace")
    if killed_reason is None and exit_code is not None and exit_code < 0:
        sig = -exit_code
        killed_reason = SIGNAL_REASONS.get(sig, f"killed by signal {_signame(sig)}")
    if killed_reason is None and exit_code not in (0, None):
        lines = stderr.strip().splitlines()
        if lines and lines[-1].startswith("MemoryError"):
            killed_reason = "memory limit (MemoryError)"
    if truncated:
        stdout_note = f"\n[output truncated at {max_output} bytes]"
        stdout += stdout_note
    figures, notes = _figures_from(events)
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=exit_code,
        timed_out=timed_out,
        killed_reason=killed_reason,
        truncated=truncated,
        duration_s=time.monotonic() - start,
        figures=figures,
        figure_notes=notes,
    )


def _init_pid(status: bytes) -> int | None:
    for line in bytes(status).decode(errors="replace").splitlines():
        if '"init"' in line:
            try:
                return int(json.loads(line)["pid"])
            except (ValueError, KeyError):
                return None
    return None


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


@functools.lru_cache(maxsize=1)
def sandbox_available() -> tuple[bool, str]:
    """(True, "") when run_python works on this machine, else (False, the reason). Cached."""
    try:
        r = run_python("print('ok')", timeout_s=10)
    except SandboxUnavailable as e:
        return False, str(e)
    if r.stdout.strip() != "ok":
        return False, f"sandbox probe failed: exit {r.exit_code}, {r.stderr.strip()[-300:]}"
    return True, ""


def python_tool(code: str, timeout_s: float = 10.0):
    """The `python` tool: run code with figures on; a ToolResult whose text is what a model
    should read (output, errors, limits, one line per figure) and whose figures go to the user."""
    from lmforge.tools.protocol import ToolResult

    # numpy and matplotlib take about 200 MB of address space before they draw anything
    r = run_python(code, timeout_s=timeout_s, memory_mb=512, figures=True)
    parts = []
    if r.stdout:
        parts.append(r.stdout.rstrip("\n"))
    if r.stderr:
        parts.append("stderr:\n" + r.stderr.rstrip("\n"))
    if r.killed_reason:
        parts.append(f"[stopped: {r.killed_reason}]")
    elif r.exit_code:
        parts.append(f"[exit code {r.exit_code}]")
    parts += [f"[figure {k}: {f.width}x{f.height} PNG]" for k, f in enumerate(r.figures, 1)]
    parts += r.figure_notes
    return ToolResult("\n".join(parts) if parts else "(no output)", [f.as_dict() for f in r.figures])
