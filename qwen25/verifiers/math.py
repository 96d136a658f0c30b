"""Math answer checking (Qwen2.5-Math style): extract the final answer, normalise it, decide equivalence.

Extraction, in order: the last \\boxed{...} (braces matched, so nested \\frac{}{} survive), else the text after
the last "the answer is" (or GSM8K's "####"), else the last number in the text.
Equivalence, in order: normalised strings equal; numbers within a relative 1e-4 (a percentage also matches its
fraction: 50\\% == 0.5); tuples, sets and intervals element by element; sympy proves a - b == 0. The sympy step
runs in a forked child process that is killed after `timeout` seconds, so a pathological expression (2^(10^10))
can never hang the caller.
"""

from __future__ import annotations

import math
import os
import re
import select
import signal

__all__ = ["extract_answer", "last_boxed", "normalize", "is_equiv", "math_equal", "sympy_equal", "parse_number"]


# ---- extraction ------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (brace matched), or of `\\boxed 5`; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)  # just after the command's name
    if text[i:i + 1] == " ":  # "\boxed 5": up to the next space or dollar sign
        return re.split(r"[\s$]", text[i + 1:].lstrip(), maxsplit=1)[0] or None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: no answer rather than a truncated one


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


def extract_answer(text: str) -> str | None:
    """The final answer in a model's text: last \\boxed{}, else 'the answer is ...' / '#### ...', else last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(re.finditer(r"(?:the (?:final )?answer is|####)\s*:?\s*", text, flags=re.IGNORECASE))
    if matches:
        rest = text[matches[-1].end():].strip()
        # Up to the end of the sentence: a period followed by space/end (not a decimal point), or a newline.
        rest = re.split(r"\.(?:\s|$)|\n", rest, maxsplit=1)[0].strip()
        if rest:
            return rest.strip("$ ")
    numbers = re.findall(_NUMBER, text.replace("$", " "))
    return numbers[-1].rstrip(",") if numbers else None


# ---- normalisation ---------------------------------------------------------------------------------------
_UNIT_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}")


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (one-character arguments without braces)."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)


def normalize(answer: str) -> str:
    """A canonical string for an answer: LaTeX spacing, \\left/\\right, $, units in \\text{}, degrees, 'x =',
    thousands separators, trailing periods and unit words removed; \\dfrac -> \\frac; '.5' -> '0.5'."""
    s = str(answer).strip().replace("\u2212", "-")  # a typographic minus is a minus
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = re.sub(r"\\q?quad", " ", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _UNIT_TEXT.sub("", s).strip()
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)  # other \text{...}: keep the words
    s = s.rstrip(".").strip()
    # "x = 5" or "k=5": the value (only for a short variable name on the left).
    m = re.fullmatch(r"[A-Za-z]\w{0,2}\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    # A number followed by unit words ("5 cm", "12 dollars"): the number.
    m = re.fullmatch(rf"({_NUMBER})\s*(?:\\%|%)?\s+[A-Za-z][A-Za-z ]*", s)
    if m and "%" not in s:
        s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.replace("{,}", ",")):  # 1,000,000 -> 1000000
        s = s.replace("{,}", "").replace(",", "")
    s = _fix_fracs(s)
    s = s.replace(" ", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    if re.fullmatch(r"-?\d+\.\d*?0+", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    return s


def parse_number(s: str) -> float | None:
    """A float for '3', '-2.5', '1/4', '\\frac{1}{4}', '-\\frac{3}{2}', '50%' (= 0.5), else None."""
    s = s.replace("\\%", "%")
    percent = s.endswith("%")
    s = s.rstrip("%")
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    try:
        if m:
            value = float(m.group(2)) / float(m.group(3)) * (-1 if m.group(1) else 1)
        elif re.fullmatch(r"-?\d+(?:\.\d+)?/-?\d+(?:\.\d+)?", s):
            a, b = s.split("/")
            value = float(a) / float(b)
        elif re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", s):
            value = float(s)
        else:
            return None
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    return value / 100 if percent else value


def _numbers_close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9 if a == 0 or b == 0 else 0.0)


# ---- tuples, sets, intervals -----------------------------------------------------------------------------
def _split_top(s: str) -> list[str]:
    """Split at commas that are not inside brackets or braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _collection(s: str) -> tuple[str, list[str]] | None:
    """(kind, items) for '(1,2]' / '[a,b]' intervals and tuples, '\\{1,2\\}' sets and bare '1, 2' lists."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", _split_top(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and len(_split_top(s[1:-1])) > 1:
        return s[0] + s[-1], _split_top(s[1:-1])
    parts = _split_top(s)
    return ("list", parts) if len(parts) > 1 else None


# ---- equivalence -----------------------------------------------------------------------------------------
def is_equiv(a: str, b: str, timeout: float = 3.0) -> bool:
    """Whether two extracted answers are the same mathematical object (strings, numbers, collections, sympy)."""
    if a is None or b is None:
        return False
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    if not na or not nb:
        return False
    xa, xb = parse_number(na), parse_number(nb)
    if xa is not None and xb is not None:
        if _numbers_close(xa, xb):
            return True
        # A percentage may be written as its number ("50%" vs "50"): the reference allows either reading.
        if ("%" in na) != ("%" in nb):
            return _numbers_close(xa * 100, xb) if "%" in na else _numbers_close(xa, xb * 100)
        return False
    ca, cb = _collection(na), _collection(nb)
    if ca or cb:
        if not (ca and cb) or len(ca[1]) != len(cb[1]):
            return False
        (ka, ia), (kb, ib) = ca, cb
        if ka in ("set", "list") and kb in ("set", "list"):  # unordered: every item matched once
            left = list(ib)
            for x in ia:
                hit = next((y for y in left if is_equiv(x, y, timeout)), None)
                if hit is None:
                    return False
                left.remove(hit)
            return True
        return ka == kb and all(is_equiv(x, y, timeout) for x, y in zip(ia, ib))
    return sympy_equal(na, nb, timeout)


def math_equal(completion: str, reference: str, timeout: float = 3.0) -> bool:
    """Whether a model's full completion answers `reference` (the reference may itself be boxed text)."""
    ref = extract_answer(reference) if ("\\boxed" in reference or "####" in reference) else reference
    return is_equiv(extract_answer(completion), ref, timeout)


# ---- sympy, in a child process with a time limit ---------------------------------------------------------
def _latex_to_sympy_text(s: str) -> str:
    """A LaTeX answer as sympy-parsable text (\\frac, \\sqrt, \\cdot, \\pi, \\infty, ^, braces)."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = s.replace("\\pi", " pi ").replace("\\infty", " oo ").replace("\\ln", "log").replace("\\log", "log")
    s = re.sub(r"\\(sin|cos|tan|exp)", r"\1", s)
    for _ in range(10):  # innermost-first rewriting handles nesting
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("{", "(").replace("}", ")").replace("^", "**").replace("\\", "")
    return s


def _sympy_equal_now(a: str, b: str) -> bool:
    from sympy import simplify
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    transforms = standard_transformations + (implicit_multiplication_application, convert_xor)

    def parse(text: str):
        return parse_expr(_latex_to_sympy_text(text), transformations=transforms, evaluate=True)

    ea, eb = parse(a), parse(b)
    if ea == eb:
        return True
    diff = simplify(ea - eb)
    if diff == 0:
        return True
    value = complex(diff.evalf()) if diff.is_number else None
    return value is not None and abs(value) <= 1e-4 * max(1.0, abs(complex(ea.evalf())))


def sympy_equal(a: str, b: str, timeout: float = 3.0) -> bool:
    """Whether sympy proves a - b == 0 within `timeout` seconds (False on a parse error or on timeout).

    The work runs in a forked child: Python cannot interrupt a long C-level integer operation, a process kill
    always works.
    """
    import sympy.parsing.sympy_parser  # noqa: F401 - imported before the fork so each child starts at once

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: answer one byte, never return into the caller's code
        code = b"0"
        try:
            os.close(read)
            code = b"1" if _sympy_equal_now(a, b) else b"0"
        except BaseException:  # noqa: BLE001 - any failure means "not proven equal"
            pass
        finally:
            os.write(write, code)
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        answer = os.read(read, 1) if ready else b""
    finally:
        os.close(read)
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return answer == b"1"
