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
WRITABLE_MOUNTS = ("/dev", "/dev/pts", "/dev/shm", "/proc")  # /dev/null must stay writable; /proc is per-process


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> str | None:
    """None on success, else the error text."""
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _isolate(want_net: bool) -> dict:
    """New network + PID namespaces; as a normal user inside a new user namespace (that is what permits it)."""
    flags = CLONE_NEWPID | (CLONE_NEWNET if want_net else 0)
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    error = _unshare(flags)
    if error is None:
        return {"pid_namespace": True, "net_namespace": want_net, "user_namespace": bool(flags & CLONE_NEWUSER)}
    # Some kernels allow the network namespace but not the PID one (or the reverse): try them alone.
    info = {"pid_namespace": False, "net_namespace": False, "user_namespace": False, "unshare_error": error}
    user = CLONE_NEWUSER if os.geteuid() != 0 else 0
    if want_net and _unshare(CLONE_NEWNET | user) is None:
        info.update(net_namespace=True, user_namespace=bool(user))
        user = 0
    if _unshare(CLONE_NEWPID | user) is None:
        info.update(pid_namespace=True)
    return info


def _read_only_filesystem(work: str) -> str | None:
    """In a new mount namespace, remount every mount read-only except the working directory (bound onto
    itself first, so it is a mount of its own) and /dev, /proc. None on success, else what failed."""
    libc = _libc()
    if _unshare(CLONE_NEWNS) is not None:
        return "unshare(CLONE_NEWNS): " + os.strerror(ctypes.get_errno())
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # changes must not reach the host
        return "make mounts private: " + os.strerror(ctypes.get_errno())
    if libc.mount(work.encode(), work.encode(), None, MS_BIND | MS_REC, None) != 0:
        return "bind the working directory: " + os.strerror(ctypes.get_errno())
    failed = []
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]
    for point, options in mounts:
        point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if point == work or point in WRITABLE_MOUNTS or "ro" in options.split(","):
            continue
        keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
                   if name in options.split(","))  # flags locked in a user namespace must be kept
        if libc.mount(b"none", point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None) != 0:
            failed.append(point)
    return f"could not make read-only: {failed}" if failed else None


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
        if cfg["read_only_fs"]:
            problem = _read_only_filesystem(os.path.realpath(cfg["cwd"]))
            if problem:  # the parent reads this line to report the missing isolation
                os.write(2, f"sandbox launcher: filesystem isolation incomplete: {problem}\n".encode())
        _drop_capabilities()
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
