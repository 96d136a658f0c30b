"""Sandbox launcher, run as `python -I -S _launcher.py CONFIG.json` by qwen25.verifiers.sandbox (stdlib only).

It puts itself into new network and PID namespaces (when the kernel lets it), forks the program as PID 1 of the
new PID namespace with resource limits, enforces the wall-clock limit, and writes a JSON report. Killing PID 1
of a PID namespace kills every process in it, so a program that forks, daemonizes or calls setsid cannot leave
anything behind.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> str | None:
    """None on success, else the error text."""
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _map_user(uid: int, gid: int) -> None:
    """In a new user namespace, map our own uid/gid to themselves: files we create get a real owner (without a
    map every creat() fails with EOVERFLOW) and the program stays the unprivileged user it was."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass


def _isolate(want_net: bool) -> dict:
    """New network + PID namespaces; as a normal user inside a new user namespace (that is what permits it)."""
    flags = CLONE_NEWPID | (CLONE_NEWNET if want_net else 0)
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    error = _unshare(flags)
    if error is None and flags & CLONE_NEWUSER:
        _map_user(uid, gid)
    if error is None:
        return {"pid_namespace": True, "net_namespace": want_net, "user_namespace": bool(flags & CLONE_NEWUSER)}
    # Some kernels allow the network namespace but not the PID one (or the reverse): try them alone.
    info = {"pid_namespace": False, "net_namespace": False, "user_namespace": False, "unshare_error": error}
    user = CLONE_NEWUSER if os.geteuid() != 0 else 0
    if want_net and _unshare(CLONE_NEWNET | user) is None:
        info.update(net_namespace=True, user_namespace=bool(user))
        if user:
            _map_user(uid, gid)
        user = 0
    if _unshare(CLONE_NEWPID | user) is None:
        info.update(pid_namespace=True)
        if user:
            _map_user(uid, gid)
            info.update(user_namespace=True)
    return info


def _mount(source, target, fstype=None, flags=0, data=None) -> str | None:
    """mount(2); None on success, else 'target: error'."""
    enc = (lambda x: x.encode() if isinstance(x, str) else x)
    if _libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        return f"{target}: {os.strerror(ctypes.get_errno())}"
    return None


def _read_only_bind(path: str) -> str | None:
    return _mount(path, path, None, MS_BIND | MS_REC) or _mount(
        "none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _contain_filesystem(cfg: dict, own_proc: bool) -> list[str]:
    """A mount namespace where the program sees the host read-only and nothing private of it or of other runs:

    - every existing mount remounted read-only, except the run's working directory;
    - empty private tmpfs over the places where secrets and other runs live (/tmp, /var/tmp, /dev/shm, /run,
      /root, /home, the temp directory): only the run's own directory (working directory read-write, program
      read-only) and the Python installation are bound back at their own paths;
    - a minimal /dev (null, zero, full, random, urandom, fd links): no /dev/kmsg, disks or zram;
    - with a PID namespace, its own /proc (the host's processes and their command lines are not there), with
      /proc/sys and the other kernel knobs read-only.
    Returns what could not be done (empty: all of it)."""
    failed = []
    if _unshare(CLONE_NEWNS) is not None:
        return ["unshare(CLONE_NEWNS): " + os.strerror(ctypes.get_errno())]
    if _mount("none", "/", None, MS_REC | MS_PRIVATE) is not None:  # changes must not reach the host
        return ["make mounts private: " + os.strerror(ctypes.get_errno())]
    work = os.path.realpath(cfg["cwd"])
    if _mount(work, work, None, MS_BIND | MS_REC) is not None:  # a mount of its own: it stays writable
        return ["bind the working directory: " + os.strerror(ctypes.get_errno())]
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]
    for point, options in mounts:
        point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if ("ro" in options.split(",") or point == work or point in ("/proc", "/dev")
                or point.startswith(("/proc/", "/dev/"))):
            continue  # /proc and /dev are replaced below
        keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
                   if name in options.split(","))  # flags locked in a user namespace must be kept
        if _mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep) is not None:
            failed.append(f"read-only {point}")
    # What stays visible under the hidden directories: held open (O_PATH) before they are covered.
    hidden = sorted({d for d in ("/tmp", "/var/tmp", "/run", "/root", "/home", cfg["tempdir"])
                     if os.path.isdir(d) and not os.path.islink(d)})
    hidden = [d for d in hidden if not any(_under(d, o) and d != o for o in hidden)]
    exposed = {work: True, cfg["program"]: False}  # path -> writable
    exposed.update({p: False for p in cfg["python_paths"]})
    held = {}
    for path, writable in exposed.items():
        if any(_under(path, h) for h in hidden) and os.path.exists(path):
            held[path] = (os.open(path, os.O_PATH | os.O_CLOEXEC), writable)
    devices = {}
    for name in ("null", "zero", "full", "random", "urandom"):
        try:
            devices[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
        except OSError:
            pass
    for directory in hidden:
        mode = "1777" if directory in ("/tmp", "/var/tmp", cfg["tempdir"]) else "0755"
        error = _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={cfg['tmpfs_bytes']}")
        if error:
            failed.append(f"hide {error}")
    old = os.umask(0o022)
    try:
        for path, (fd, writable) in held.items():
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            error = _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC) or (None if writable else _mount(
                "none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV))
            if error:
                failed.append(f"expose {error}")
            os.close(fd)
        # /dev: a tmpfs with the harmless devices bound in, and a private /dev/shm
        if _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536") is None:
            for name, fd in devices.items():
                open(f"/dev/{name}", "a").close()
                if _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND) is not None:
                    failed.append(f"/dev/{name}")
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(target, f"/dev/{name}")
            os.mkdir("/dev/shm", 0o1777)
            os.chmod("/dev/shm", 0o1777)
            if (error := _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                                f"mode=1777,size={cfg['tmpfs_bytes']}")):
                failed.append(error)
        else:
            failed.append("private /dev")
    finally:
        os.umask(old)
        for fd in devices.values():
            os.close(fd)
    if own_proc:
        if (error := _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)) is not None:
            failed.append(f"own /proc: {error}")
        for knob in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"):
            if os.path.exists(knob) and (error := _read_only_bind(knob)) is not None:
                failed.append(f"read-only {error}")
        for secret in ("/proc/kcore", "/proc/kmsg", "/proc/keys", "/proc/timer_list"):
            if os.path.exists(secret):
                _mount("/dev/null", secret, None, MS_BIND)
    else:
        failed.append("own /proc (no PID namespace)")
    return failed


def _drop_capabilities() -> None:
    """Empty the capability bounding set and forbid new privileges: after exec even uid 0 holds no capability
    (cannot raise rlimits, remount, leave its cgroups or reconfigure the network)."""
    libc = _libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


# seccomp: system calls the program has no use for, refused with EPERM. Its capabilities are gone already; this
# closes what needs none: new user namespaces (unshare, clone flags; clone3's flags cannot be read: ENOSYS makes
# libc fall back to clone), AF_UNIX sockets (a host socket file reachable through the read-only view), io_uring
# (which bypasses per-call filters), ptrace of its own processes, kernel keyrings, bpf and perf events.
_SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED = {
    "x86_64": dict(ptrace=101, mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308,
                   keyctl=250, add_key=248, request_key=249, bpf=321, perf_event_open=298, userfaultfd=323,
                   io_uring_setup=425, kexec_load=246, init_module=175, finit_module=313, process_vm_readv=310,
                   process_vm_writev=311),
    "aarch64": dict(ptrace=117, mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, keyctl=219,
                    add_key=217, request_key=218, bpf=280, perf_event_open=241, userfaultfd=282, io_uring_setup=425,
                    kexec_load=104, init_module=105, finit_module=273, process_vm_readv=270, process_vm_writev=271),
}
_SOCKET, _CLONE, _CLONE3 = {"x86_64": 41, "aarch64": 198}, {"x86_64": 56, "aarch64": 220}, 435
_NEW_NAMESPACES = 0x10000000 | 0x20000000 | 0x40000000 | 0x00020000 | 0x04000000 | 0x08000000 | 0x02000000


def _seccomp() -> str | None:
    """Install the filter (no_new_privs must be set); None on success, else why not."""
    machine = os.uname().machine
    if machine not in _SECCOMP_ARCH:
        return f"no seccomp filter for {machine}"
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    # (code, jump if true, jump if false, k): a jump is a label or a count of instructions to skip
    prog: list[tuple] = [(LD, None, None, 4), (JEQ, 1, None, _SECCOMP_ARCH[machine]),
                         (RET, 0, 0, 0x00050000 | 1),  # another ABI (i386's int 0x80 on x86_64): refused
                         (LD, None, None, 0)]
    if machine == "x86_64":
        prog.append((JGE, "deny", None, 0x40000000))  # the x32 ABI: refused
    for nr in _DENIED[machine].values():
        prog.append((JEQ, "deny", None, nr))
    prog.append((JEQ, "enosys", None, _CLONE3))
    prog += [(JEQ, None, "clone", _SOCKET[machine]), (LD, None, None, 16), (JEQ, "deny", "allow", 1)]
    clone = len(prog)
    prog += [(JEQ, None, "allow", _CLONE[machine]), (LD, None, None, 16), (JSET, "deny", "allow", _NEW_NAMESPACES)]
    labels = {"clone": clone, "allow": len(prog), "deny": len(prog) + 1, "enosys": len(prog) + 2}
    prog += [(RET, 0, 0, 0x7FFF0000), (RET, 0, 0, 0x00050000 | 1), (RET, 0, 0, 0x00050000 | 38)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    def offset(i, target):
        return 0 if target is None else labels[target] - i - 1 if isinstance(target, str) else target

    table = (Filter * len(prog))(*[Filter(code, offset(i, jt), offset(i, jf), k)
                                   for i, (code, jt, jf, k) in enumerate(prog)])
    program = Program(len(prog), table)
    if _libc().prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        return "seccomp: " + os.strerror(ctypes.get_errno())
    return None


def _drop_user(uid: int) -> None:
    """Become an unprivileged user (root's files, 0600 project files and /etc/shadow become unreadable): no
    supplementary groups, then gid and uid. After setresuid from 0 every capability is gone."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _child(cfg: dict, ns: dict) -> None:
    """In the forked child: die with the launcher, join cgroups, set rlimits, redirect output, exec."""
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if not ns["pid_namespace"]:
            os.setpgid(0, 0)  # without a PID namespace the launcher kills this process group at the end
        for procs in cfg["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write("0")  # "0" = the writing process; its descendants inherit the cgroup
        limits = {resource.RLIMIT_AS: cfg["memory_bytes"], resource.RLIMIT_CPU: cfg["cpu_seconds"],
                  resource.RLIMIT_FSIZE: cfg["max_output_bytes"], resource.RLIMIT_CORE: 0,
                  resource.RLIMIT_NPROC: cfg["max_processes"]}
        for what, value in limits.items():
            if value is not None:
                resource.setrlimit(what, (value, value))
        out = os.open(cfg["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(cfg["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stdin = os.open(cfg.get("stdin") or os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        missing = []
        if cfg["read_only_fs"]:
            missing += _contain_filesystem(cfg, own_proc=ns["pid_namespace"])
        _drop_capabilities()
        if os.geteuid() == 0 and cfg.get("uid") is not None:
            _drop_user(cfg["uid"])
        if (problem := _seccomp()) is not None:
            missing.append(problem)
        if missing:  # the parent reads this line to report the missing isolation
            os.write(2, f"sandbox launcher: isolation incomplete: {'; '.join(missing)}\n".encode())
            if not cfg.get("allow_weak_isolation"):
                os._exit(125)  # refused: the program never runs with less isolation than asked for
        os.chdir(cfg["cwd"])
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report and leave; never run the launcher's code twice
        os.write(2, f"sandbox launcher: cannot start the program: {e!r}\n".encode())
        os._exit(126)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    if cfg.get("namespaces", True):
        ns = _isolate(not cfg["network"])
    else:  # asked to run without namespaces (hosts that refuse them, and the tests of the fallback)
        ns = {"pid_namespace": False, "net_namespace": False, "user_namespace": False}
    if not cfg["network"] and not ns["net_namespace"]:
        cfg["argv"] = cfg["fallback_argv"]  # no namespace: block sockets in-process (weaker, reported)
        ns["network_fallback"] = "socket functions replaced by a prelude"
    weak = [what for what, ok in (("PID namespace", ns["pid_namespace"]),
                                  ("network namespace", ns["net_namespace"] or cfg["network"])) if not ok]
    if weak and not cfg.get("allow_weak_isolation"):  # refused: the program does not run
        with open(cfg["report"], "w") as f:
            json.dump({"refused": f"no {' and no '.join(weak)} ({ns.get('unshare_error', 'namespaces off')})",
                       "isolation": ns}, f)
        return
    pid = os.fork()
    if pid == 0:
        _child(cfg, ns)
    timed_out = False

    def on_alarm(signum, frame):
        nonlocal timed_out
        timed_out = True
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout"])
    _, status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not ns["pid_namespace"]:  # leftovers of the program's process group (setsid escapes this: documented)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report = {"timed_out": timed_out, "isolation": ns,
              "returncode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
              "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
    with open(cfg["report"], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
