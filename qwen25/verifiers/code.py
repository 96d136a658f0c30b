"""Code verification by unit tests (HumanEval and MBPP formats) in the sandbox, and the unbiased pass@k estimator.

A HumanEval problem has `prompt` (signature + docstring), `test` (defines check(candidate)) and `entry_point`.
The program run is prompt + completion + test + `check(entry_point)`; it passes when it exits cleanly within
the limits. A completion that repeats the prompt (chat models often do) is accepted as well.
An MBPP problem has `test_list` (assert statements) and optional `test_setup_code`; the prompt is prose, so the
program is the completion's code + setup + asserts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .sandbox import Limits, SandboxResult, run_many, run_python


def test_program(problem: dict, completion: str) -> str:
    """The program that tests a completion: MBPP format when the problem has `test_list`, else HumanEval."""
    if "test_list" in problem:
        return "\n".join([completion, problem.get("test_setup_code") or "", *problem["test_list"]]) + "\n"
    return humaneval_program(problem, completion)


def humaneval_program(problem: dict, completion: str) -> str:
    """The test program of one completion: the prompt (unless the completion already contains it), the
    completion, the tests and the call of check() on the entry point."""
    body = completion if completion.lstrip().startswith(problem["prompt"].strip()[:40]) and \
        problem["prompt"].strip() else problem["prompt"] + completion
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def extract_code(completion: str) -> str:
    """The code of a chat answer: the first ```python fenced block when there is one, else the text itself."""
    import re

    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", completion, flags=re.DOTALL)
    return m.group(1) if m else completion


def check_program(problem: dict, completion: str, timeout: float = 10.0,
                  limits: Limits | None = None) -> SandboxResult:
    """Run a completion's tests in the sandbox: the result's status is passed/failed/timeout/error."""
    limits = limits or Limits(timeout=timeout)
    return run_python(test_program(problem, extract_code(completion)), limits)


def check_many(problems: Sequence[dict], completions: Sequence[str], limits: Limits | None = None,
               workers: int | None = None, progress: bool = False) -> list[SandboxResult]:
    """check_program for many (problem, completion) pairs in parallel sandbox processes."""
    programs = [test_program(p, extract_code(c)) for p, c in zip(problems, completions)]
    return run_many(programs, limits or Limits(), workers=workers, progress=progress, desc="tests")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n samples, c correct) per problem."""
    return sum(pass_at_k(n, c, k) for n, c in counts) / max(len(counts), 1)
