"""Run untrusted (model-generated) Python in a separate, limited process: the sandbox of evaluation and RL.

Every run gets:
  - a throw-away working directory (deleted afterwards) and a clean environment (no PYTHONPATH, HOME there);
  - a wall-clock limit (the launcher SIGKILLs the program) and a CPU-time limit (RLIMIT_CPU);
  - a memory limit: RLIMIT_AS per process, plus a memory cgroup for the whole run where the host lets us
    create one (cgroup v1 or v2, as root);
  - a process limit: a pids cgroup (pids.max) where available, else RLIMIT_NPROC (enforced for non-root users);
  - no network: a new network namespace (only a loopback that is down), via unshare(2); as a normal user inside
    a new user namespace. Where the kernel refuses namespaces, a fallback prelude replaces socket creation
    with an error (weaker: a determined program can undo it) and `isolation` in the result says so;
  - a new PID namespace: the program is PID 1 there, so killing it kills everything it started;
  - a contained view of the filesystem (a new mount namespace): every host mount read-only; empty private tmpfs
    over /tmp, /var/tmp, /dev/shm, /run, /root, /home and the temp directory, into which only the run's own
    directory (working directory writable, program read-only) and the Python installation are bound back; a
    minimal /dev (null, zero, full, random, urandom); its own /proc (the host's processes, their command lines
    and environments are not there) with /proc/sys and the other kernel knobs read-only;
  - no capabilities: the bounding set is emptied before exec and no_new_privs set, so even when the evaluator
    runs as root the program cannot raise its rlimits, remount, leave its cgroups or touch the network setup;
  - its own user: when the evaluator is root, the program runs as a fresh unprivileged uid that owns only its
    working directory (root's 0600 files, /etc/shadow and other runs' files are unreadable);
  - a seccomp filter refusing what no program of ours needs: new namespaces, AF_UNIX sockets (host socket files),
    io_uring, ptrace, keyrings, bpf, perf events, module loading;
  - output capped by RLIMIT_FSIZE on the stdout/stderr files (and any file it writes).
The result is passed / failed / timeout / error, with the output, the exit status, the reason a limit
stopped it (timeout, memory, processes, cpu, output, network, filesystem) and the isolation actually applied.

Where the kernel refuses a piece of this (no namespaces, no mounts, no seccomp), the run is refused (status
"error", reason "isolation") unless Limits(allow_weak_isolation=True), which runs it with what is left and
`isolation["missing"]` naming the rest; cgroups are optional (rlimits stand in). What it does not protect:
world-readable host files outside the hidden directories stay readable (read-only); CPU time is shared; a
kernel exploit is out of scope (use a VM for hostile code at scale).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_launcher.py")

# Used only when no network namespace could be made: make socket creation fail inside the program.
SOCKET_BLOCK_PRELUDE = """\
def _qwen25_block_network():
    import socket as _s
    def _refuse(*args, **kwargs):
        raise OSError(101, "network access is disabled in the sandbox")
    _s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _refuse
_qwen25_block_network()
del _qwen25_block_network
"""


@dataclass
class Limits:
    """Resource limits of one sandboxed run."""

    timeout: float = 10.0  # wall-clock seconds
    cpu_seconds: int | None = None  # default: ceil(timeout) + 1
    memory_mb: int = 1024  # address space per process, and memory of the whole run where a cgroup exists
    max_processes: int = 16  # processes + threads of the whole run
    max_output_bytes: int = 1 << 20  # per stream (stdout, stderr)
    network: bool = False
    site_packages: bool = False  # False: stdlib only (python -S), which also starts ~5x faster
    read_only_fs: bool = True  # contain the filesystem (a mount namespace: see the module docstring)
    namespaces: bool = True  # False: no network/PID namespaces (the fallback: socket prelude, process-group kill)
    # Run even where the kernel refuses part of the isolation (namespaces, mounts, seccomp), with what is left and
    # `isolation` saying what is missing. False: such a run is refused (status error, reason "isolation").
    allow_weak_isolation: bool = False


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | error
    returncode: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    reason: str = ""  # what stopped it: timeout, memory, processes, cpu, output, network, exception, ...
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# ---- cgroups -----------------------------------------------------------------------------------------
def _own_cgroup(controller: str) -> tuple[str, bool] | None:
    """(path of this process's cgroup for a v1 controller, or the v2 one; is_v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return f"/sys/fs/cgroup/{controller}{path}", False
    for line in lines:
        if line.startswith("0::"):
            return f"/sys/fs/cgroup{line[3:]}", True
    return None


def _make_cgroup(controller: str, limits: dict[str, str]) -> Path | None:
    """A fresh child cgroup with the given limit files written, or None if this host does not allow it."""
    found = _own_cgroup(controller)
    if found is None:
        return None
    base, _ = found
    path = Path(base) / f"qwen25-sandbox-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        for name, value in limits.items():
            (path / name).write_text(value)
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _remove_cgroup(path: Path) -> None:
    """Kill whatever is still in the cgroup (a process that escaped its process group in the fallback mode),
    then remove it."""
    for _ in range(200):  # processes of a killed namespace may take a moment to be reaped
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _cgroup_counter(path: Path | None, fname: str, key: str | None = None) -> int:
    """A counter of a cgroup: the first number of `fname` (memory.failcnt), or the line `key N` of it
    (pids.events "max N"); 0 when there is no such cgroup or file."""
    if path is None:
        return 0
    try:
        text = (path / fname).read_text()
    except OSError:
        return 0
    if key is None:
        return int(text.split()[0]) if text.split() else 0
    for line in text.splitlines():
        if line.startswith(key + " "):
            return int(line.split()[1])
    return 0


def _cgroups(limits: Limits) -> dict[str, Path]:
    """The pids and memory cgroups of one run (those the host allows)."""
    groups = {}
    mem = str(limits.memory_mb * 2**20)
    pids = _make_cgroup("pids", {"pids.max": str(limits.max_processes)})
    if pids is not None:
        groups["pids"] = pids
    memory = _make_cgroup("memory", {"memory.limit_in_bytes": mem}) or _make_cgroup("memory", {"memory.max": mem})
    if memory is not None:
        groups["memory"] = memory
    return groups


# ---- running -----------------------------------------------------------------------------------------
def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _classify(report: dict, stderr: str, groups: dict[str, Path]) -> tuple[str, str]:
    """(status, reason) from the launcher's report, the program's stderr and the cgroup counters."""
    import signal as sig

    if report.get("timed_out"):
        return "timeout", "timeout"
    pids_hit = _cgroup_counter(groups.get("pids"), "pids.events", "max")
    mem_hit = _cgroup_counter(groups.get("memory"), "memory.failcnt")
    if report.get("returncode") == 0:
        return "passed", ""
    signum = report.get("signal")
    if signum == sig.SIGXCPU:
        return "timeout", "cpu"
    if signum == sig.SIGXFSZ or "File too large" in stderr:  # Python ignores SIGXFSZ: writes fail instead
        return "error", "output"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or (signum == sig.SIGKILL and mem_hit):
        return "error", "memory"
    if pids_hit or "Resource temporarily unavailable" in stderr or "can't start new thread" in stderr:
        return "error", "processes"
    if any(s in stderr for s in ("Network is unreachable", "network access is disabled", "Connection refused",
                                 "Temporary failure in name resolution", "Name or service not known")):
        return "error", "network"
    if "Read-only file system" in last:
        return "error", "filesystem"
    if report.get("returncode") == 126 and "sandbox launcher" in stderr:
        return "error", "launcher"
    if signum is not None:
        return "error", f"signal {sig.Signals(signum).name}"
    return "failed", last.split(":")[0] if last else "exit status"


def run_python(code: str, limits: Limits | None = None, stdin: str | None = None,
               files: dict[str, str] | None = None) -> SandboxResult:
    """Run Python source in the sandbox; `files` are written into its working directory first."""
    limits = limits or Limits()
    root = Path(tempfile.mkdtemp(prefix="qwen25-sandbox-"))
    groups: dict[str, Path] = {}
    started = time.perf_counter()
    try:
        work = root / "work"
        work.mkdir()
        for name, text in (files or {}).items():
            target = (work / name).resolve()
            if work.resolve() not in target.parents:
                raise ValueError(f"sandbox file {name!r} is outside the working directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        program = root / "program.py"
        program.write_text(code)
        if stdin is not None:
            (root / "stdin.txt").write_text(stdin)
        groups = _cgroups(limits)
        uid = None
        if os.geteuid() == 0:  # the program runs as a user of its own, who owns the working directory only
            uid = random.SystemRandom().randrange(1_000_000, 1_000_000_000)
            for directory, _, names in os.walk(work):
                os.chown(directory, uid, uid)
                for name in names:
                    os.chown(os.path.join(directory, name), uid, uid)
        cfg = {
            "argv": [sys.executable, "-I", *([] if limits.site_packages else ["-S"]), str(program)],
            "env": {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                    "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},  # threads count against the pids limit
            "cwd": str(work), "stdout": str(root / "stdout.txt"), "stderr": str(root / "stderr.txt"),
            "stdin": str(root / "stdin.txt") if stdin is not None else None, "report": str(root / "report.json"),
            "timeout": float(limits.timeout),
            "cpu_seconds": limits.cpu_seconds or int(math.ceil(limits.timeout)) + 1,
            "memory_bytes": limits.memory_mb * 2**20, "max_output_bytes": limits.max_output_bytes,
            # Without a pids cgroup, RLIMIT_NPROC is the process limit (it binds non-root users only).
            "max_processes": None if "pids" in groups else limits.max_processes,
            "cgroup_procs": [str(g / "cgroup.procs") for g in groups.values()],
            "network": limits.network, "read_only_fs": limits.read_only_fs, "namespaces": limits.namespaces,
            "allow_weak_isolation": limits.allow_weak_isolation, "uid": uid, "program": str(program),
            "tempdir": os.path.realpath(tempfile.gettempdir()), "python_paths": _python_paths(),
            "tmpfs_bytes": limits.memory_mb * 2**20,
            # Run instead when no network namespace could be made: the socket-blocking prelude, then the program.
            "fallback_argv": [sys.executable, "-I", *([] if limits.site_packages else ["-S"]), "-c",
                              SOCKET_BLOCK_PRELUDE + f"import runpy\nrunpy.run_path({str(program)!r}, "
                                                     "run_name='__main__')\n"],
        }
        (root / "config.json").write_text(json.dumps(cfg))
        launcher = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), str(root / "config.json")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        try:
            _, launcher_err = launcher.communicate(timeout=limits.timeout + 10)
        except subprocess.TimeoutExpired:  # the launcher itself hung: kill its session (the child dies with it)
            os.killpg(launcher.pid, 9)
            _, launcher_err = launcher.communicate()
        try:
            report = json.loads((root / "report.json").read_text())
        except (OSError, json.JSONDecodeError):
            return SandboxResult("error", stderr=launcher_err.decode(errors="replace"), reason="launcher",
                                 seconds=time.perf_counter() - started)
        if "refused" in report:
            return SandboxResult("error", stderr=f"sandbox refused to run the program: {report['refused']} "
                                                 "(Limits(allow_weak_isolation=True) runs it with less isolation)",
                                 reason="isolation", seconds=time.perf_counter() - started,
                                 isolation=report["isolation"])
        stdout = _read(root / "stdout.txt", limits.max_output_bytes)
        stderr = _read(root / "stderr.txt", limits.max_output_bytes)
        status, reason = _classify(report, stderr, groups)
        missing = next((line.split("isolation incomplete: ", 1)[1] for line in stderr.splitlines()
                        if line.startswith("sandbox launcher: isolation incomplete: ")), "")
        isolation = {**report["isolation"], "cgroups": sorted(groups), "user": "own uid" if uid else "caller's",
                     "read_only_fs": limits.read_only_fs and not missing, "missing": missing}
        if report.get("returncode") == 125 and missing and not limits.allow_weak_isolation:
            status, reason = "error", "isolation"
        return SandboxResult(status, report.get("returncode"), report.get("signal"), stdout, stderr,
                             time.perf_counter() - started, reason, isolation)
    finally:
        for g in groups.values():
            _remove_cgroup(g)
        shutil.rmtree(root, ignore_errors=True)


def _python_paths() -> list[str]:
    """What the program needs of this Python (bound back read-only when their directories are hidden)."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(paths)


def run_many(programs: list[str], limits: Limits | None = None, workers: int | None = None,
             progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
    """Run programs in parallel sandboxes (each its own process); results in input order."""
    workers = workers or max(2, (os.cpu_count() or 2) * 2)  # programs mostly wait on process start-up
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda code: run_python(code, limits), programs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(programs), desc=desc)
        return list(results)


def isolation_support() -> dict:
    """What this host allows, measured by running a tiny program: namespaces, cgroups, whether we are root."""
    result = run_python("print('ok')", Limits(timeout=10))
    return {"root": os.geteuid() == 0, **result.isolation, "works": result.passed}
