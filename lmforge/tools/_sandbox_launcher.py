"""Sandbox launcher: the process `lmforge.tools.sandbox` starts to run untrusted Python.

Run as `python -I -S _sandbox_launcher.py STATUS_FD` with one JSON plan on stdin (built by
`sandbox.py`, which also documents the threat model in docs/SANDBOX.md). Standard library only
and no lmforge imports: it must start fast and must not depend on the caller's environment.

Process tree (L = this launcher, S = the namespace's init, C = the user's program):

    caller -- L (host PID and mount namespaces; waits, reports S's host pid and exit)
                \-- S (PID 1 of new PID/net/IPC/UTS namespaces, in its own mount namespace;
                     builds the file system view, drops privileges, reaps)
                      \-- C (rlimits, no_new_privs, seccomp, then exec python on the code)

When C exits, S exits, and the kernel kills everything left in the PID namespace: nothing the
code started can outlive the call. The caller enforces the wall-clock limit by SIGKILLing S.
With figures on, S first kills what is left, then hands back up to N *.png regular files from
/tmp as they are (the caller decodes and checks them).

Two ways in, one result:
- as root (CI): plain namespaces, then S drops to a fresh uid (setresuid), so RLIMIT_NPROC
  applies and no file on the host is owned by the sandbox's user;
- as an ordinary user: a user namespace (mapping the caller to root inside, which is needed to
  mount) and, for C only, a nested user namespace that maps it to uid 65534 so it execs
  without any capability.
Status goes back as JSON lines on STATUS_FD (never on the program's stdout/stderr).
"""
import base64
import ctypes
import json
import os
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
NS_FLAGS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bits -> mount flags: a remount inside a user namespace must keep the flags the
# host mount already has (they are "locked"), or the kernel refuses it.
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME,
            2048: MS_NODIRATIME, 4096: MS_RELATIME}

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 24, 38, 22
SECCOMP_MODE_FILTER = 2
UID_BASE = 1_500_000_000

# Syscall numbers (from the kernel's uapi headers) for the two architectures we filter.
ARCHES = {
    "x86_64": {
        "audit_arch": 0xC000003E,
        "pivot_root": 155, "clone": 56, "clone3": 435, "socket": 41,
        "deny": {
            "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
            "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248, "request_key": 249,
            "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246,
            "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
            "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
            "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
            "syslog": 103, "quotactl": 179, "quotactl_fd": 443, "open_by_handle_at": 304,
            "name_to_handle_at": 303, "process_vm_readv": 310, "process_vm_writev": 311,
            "kcmp": 312, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
            "fspick": 433, "mount_setattr": 442, "pidfd_getfd": 438, "iopl": 172, "ioperm": 173,
            "uselib": 134, "vhangup": 153, "lookup_dcookie": 212,
        },
    },
    "aarch64": {
        "audit_arch": 0xC00000B7,
        "pivot_root": 41, "clone": 220, "clone3": 435, "socket": 198,
        "deny": {
            "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
            "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218,
            "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104,
            "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
            "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
            "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
            "syslog": 116, "quotactl": 60, "quotactl_fd": 443, "open_by_handle_at": 265,
            "name_to_handle_at": 264, "process_vm_readv": 270, "process_vm_writev": 271,
            "kcmp": 272, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
            "fspick": 433, "mount_setattr": 442, "pidfd_getfd": 438, "vhangup": 58,
            "lookup_dcookie": 18,
        },
    },
}

RLIMITS = {
    "cpu": "RLIMIT_CPU", "as": "RLIMIT_AS", "nproc": "RLIMIT_NPROC", "fsize": "RLIMIT_FSIZE",
    "nofile": "RLIMIT_NOFILE", "core": "RLIMIT_CORE", "memlock": "RLIMIT_MEMLOCK",
    "msgqueue": "RLIMIT_MSGQUEUE", "stack": "RLIMIT_STACK",
}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, dst, fstype, flags, data=None):
    _check(libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data)), f"mount {src or fstype} on {dst}")


def prctl(option, a=0, b=0, c=0, d=0):
    _check(libc.prctl(option, a, b, c, d), f"prctl({option})")


def write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def status(fd, **event):
    data = memoryview((json.dumps(event) + "\n").encode())
    while data:  # a figure's line is larger than a pipe's buffer
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------- file system view


def _bind(root, src, readonly=True):
    dst = root + src
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "w").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    if readonly:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        f_flag = os.statvfs(dst).f_flag
        for st, ms in ST_TO_MS.items():
            if f_flag & st:
                flags |= ms
        mount(None, dst, None, flags)


def build_root(plan, userns):
    """Private mount namespace -> a tmpfs root with only what Python needs, then pivot_root."""
    root = plan["root"]
    # The mount namespace is S's own (not the launcher's): the launcher keeps the host's view,
    # and pivot_root below moves only S (and what it starts) into the new root.
    _check(libc.unshare(CLONE_NEWNS), "unshare(mount)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    # /tmp first, so that read-only paths under the host's /tmp stay visible (mounted on top).
    os.makedirs(root + "/tmp", exist_ok=True)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={plan['tmp_bytes']},nr_inodes={plan['tmp_inodes']},mode=1777")
    with open(root + "/tmp/main.py", "w", encoding="utf-8") as f:
        f.write(plan["code"])
    for src in plan["ro_binds"]:
        _bind(root, src)
    for path, target in plan["symlinks"]:
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(target, root + path)
    for src, dst in plan["copies"]:
        os.makedirs(os.path.dirname(root + dst), exist_ok=True)
        with open(src, "rb") as f_in, open(root + dst, "wb") as f_out:
            f_out.write(f_in.read())
    for dst, text in plan["files"].items():
        os.makedirs(os.path.dirname(root + dst), exist_ok=True)
        with open(root + dst, "w") as f:
            f.write(text)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in plan["devices"]:
        _bind(root, dev, readonly=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("shm", "/tmp")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", exist_ok=True)
    # A fresh proc for the new PID namespace: it shows the sandbox's own processes only, and
    # (subset=pid, Linux >= 5.8) none of the kernel's global files.
    try:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "subset=pid,hidepid=invisible")
    except SetupError:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    pivot = ARCHES[os.uname().machine]["pivot_root"]
    # pivot_root(".", "."): the old root ends up stacked under the new one; detach it.
    _check(libc.syscall(pivot, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _check(libc.sethostname(b"sandbox", 7), "sethostname")
    os.chdir("/tmp")


# ---------------------------------------------------------------- seccomp


def _bpf_stmt(code, k):
    return (code, 0, 0, k)


def _bpf_jump(code, k, jt, jf):
    return (code, jt, jf, k)


def seccomp_program(arch_name):
    """A deny-list filter: kernel-attack-surface and escape syscalls fail with EPERM.

    Namespaces, mounts and capabilities already contain the code; this removes the syscalls a
    kernel exploit or a namespace trick would need (new user namespaces, ptrace, bpf, io_uring,
    keyrings, new mount API...). Sockets other than AF_UNIX are refused too.
    """
    a = ARCHES[arch_name]
    LD_W_ABS, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS

    def errno(e):
        return 0x00050000 | e  # SECCOMP_RET_ERRNO

    prog = [
        _bpf_stmt(LD_W_ABS, 4),  # seccomp_data.arch
        _bpf_jump(JEQ, a["audit_arch"], 1, 0),
        _bpf_stmt(RET, KILL),  # foreign ABI (e.g. int 0x80 on x86_64): never allowed
        _bpf_stmt(LD_W_ABS, 0),  # seccomp_data.nr
    ]
    if arch_name == "x86_64":
        prog += [_bpf_jump(JGE, 0x40000000, 0, 1), _bpf_stmt(RET, KILL)]  # x32 ABI
    for nr in sorted(set(a["deny"].values())):
        prog += [_bpf_jump(JEQ, nr, 0, 1), _bpf_stmt(RET, errno(1))]  # EPERM
    # clone3 passes flags in memory the filter cannot read: say ENOSYS, libc falls back to clone.
    prog += [_bpf_jump(JEQ, a["clone3"], 0, 1), _bpf_stmt(RET, errno(38))]
    prog += [
        _bpf_jump(JEQ, a["clone"], 0, 4),
        _bpf_stmt(LD_W_ABS, 16),  # args[0] (low 32 bits): clone flags
        _bpf_jump(JSET, NS_FLAGS, 0, 1),
        _bpf_stmt(RET, errno(1)),
        _bpf_stmt(RET, ALLOW),
        _bpf_jump(JEQ, a["socket"], 0, 4),
        _bpf_stmt(LD_W_ABS, 16),  # args[0]: address family
        _bpf_jump(JEQ, 1, 1, 0),  # AF_UNIX
        _bpf_stmt(RET, errno(97)),  # EAFNOSUPPORT
        _bpf_stmt(RET, ALLOW),
        _bpf_stmt(RET, ALLOW),
    ]
    return prog


def install_seccomp(arch_name):
    prog = seccomp_program(arch_name)

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    arr = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), arr)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p).value, 0, 0),
           "seccomp filter")


# ---------------------------------------------------------------- figures


def _candidates(folder):
    """(mtime, name, dir fd) of the *.png names in `folder`, oldest first. The folder itself is
    opened without following a link (the program could make the figures folder one), and its
    files are later opened relative to it."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    out = []
    try:
        for name in os.listdir(dfd):
            if name.lower().endswith(".png"):
                try:
                    out.append((os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime_ns, name, dfd))
                except OSError:
                    pass
    except OSError:
        pass
    return sorted(out)


def _read_figure(name, dfd, max_bytes):
    """(bytes, None) or (None, why): a regular file only, opened without following a link or
    blocking on a FIFO, read up to the size limit."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None, "not a readable regular file"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > max_bytes:
            return None, f"larger than {max_bytes // 2**20} MB"
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            return None, f"larger than {max_bytes // 2**20} MB"
        return b"".join(chunks), None
    finally:
        os.close(fd)


def send_figures(spec, status_fd):
    """After the program: stop whatever it left running (so no file changes while read), then
    hand back the PNG candidates as they are. Candidates: *.png directly in /tmp (the program's own
    savefig), then those the bootstrap saved; at most spec["max"] of them. Nothing else leaves:
    the caller decodes each one and keeps only valid images within its limits."""
    try:
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
    except OSError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    found = _candidates("/tmp") + _candidates(spec["dir"])  # (init exits soon after: the dir fds go with it)
    for _, name, dfd in found[:spec["max"]]:
        data, why = _read_figure(name, dfd, spec["max_bytes"])
        if data is None:
            status(status_fd, event="figure", skipped=why)
        else:
            status(status_fd, event="figure", data=base64.b64encode(data).decode("ascii"))
    status(status_fd, event="figures_left", count=max(0, len(found) - spec["max"]))


# ---------------------------------------------------------------- the three processes


def set_rlimits(limits):
    import resource

    for key, value in limits.items():
        res = getattr(resource, RLIMITS[key])
        soft, hard = (value, value) if not isinstance(value, list) else value
        resource.setrlimit(res, (soft, hard))


def map_ids(inner, outer_uid, outer_gid):
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"{inner} {outer_uid} 1\n")
    write_file("/proc/self/gid_map", f"{inner} {outer_gid} 1\n")


def run_child(plan, userns, status_fd):
    """C: the user's program. Never returns."""
    os.close(status_fd)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # Before the nested user namespace: its process count limit is taken from ours.
    set_rlimits(plan["rlimits"])
    if userns:
        # Still uid 0 (with capabilities) in the outer user namespace: step into a nested one
        # as uid 65534 so that exec leaves the program with no capability at all.
        _check(libc.unshare(CLONE_NEWUSER), "unshare(user) for the program")
        map_ids(65534, 0, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    install_seccomp(os.uname().machine)
    os.execve(plan["python"], [plan["python"]] + plan["python_args"], plan["env"])


def run_init(plan, userns, status_fd):
    """S: PID 1 of the sandbox. Never returns."""
    code = 1
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # SIGINT from inside must not end init
        build_root(plan, userns)
        if not userns:
            for cap in range(64):  # drop the bounding set while we still may (root path)
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    break
            uid = plan["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # from root to a fresh uid: all capabilities go
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # changing credentials cleared it
        os.set_inheritable(status_fd, False)
        pid = os.fork()
        if pid == 0:
            try:
                run_child(plan, userns, status_fd)
            except BaseException as e:  # noqa: BLE001 - report whatever stopped the exec
                os.write(2, f"sandbox: could not start the program: {e}\n".encode())
            os._exit(127)
        while True:  # reap orphans until the program itself ends
            try:
                wpid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if wpid == pid:
                if os.WIFSIGNALED(st):
                    status(status_fd, event="exit", signal=os.WTERMSIG(st))
                else:
                    status(status_fd, event="exit", code=os.WEXITSTATUS(st))
                code = 0
                if plan.get("figures"):
                    try:
                        send_figures(plan["figures"], status_fd)
                    except Exception as e:  # noqa: BLE001 - the program ran; only its figures are lost
                        status(status_fd, event="figure", skipped=f"collecting figures failed: {e}")
                break
    except BaseException as e:  # noqa: BLE001
        try:
            status(status_fd, event="error", message=f"sandbox setup failed: {e}")
        except OSError:
            pass
    os._exit(code)


def main():
    status_fd = int(sys.argv[1])
    plan = json.loads(sys.stdin.buffer.read())
    try:
        if os.uname().machine not in ARCHES:
            raise SetupError(f"no seccomp filter for architecture {os.uname().machine}")
        userns = os.geteuid() != 0
        flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        if userns:
            uid, gid = os.geteuid(), os.getegid()
            _check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user, pid, net, ipc, uts)")
            map_ids(0, uid, gid)
        else:
            _check(libc.unshare(flags), "unshare(pid, net, ipc, uts)")
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the caller dies, so do we (and then S)
    except (SetupError, OSError) as e:
        status(status_fd, event="error", message=f"sandbox unavailable: {e}")
        return 1
    if plan.get("uid") is None:
        # A uid no other process uses: our pid is unique among live processes, so concurrent
        # sandboxes never share a process count (RLIMIT_NPROC) or signal each other.
        plan["uid"] = UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        run_init(plan, userns, status_fd)
    status(status_fd, event="init", pid=pid)
    _, st = os.waitpid(pid, 0)
    status(status_fd, event="init_exit", signal=os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
