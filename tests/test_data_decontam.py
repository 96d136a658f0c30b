"""LCS decontamination: exact LCS, the report's thresholds, and the indexed search equal to brute force."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen25.data.decontam import (TestSetIndex, is_contaminated, lcs_length, lcs_length_dp, lcs_threshold,
                                  read_test_items, window_starts)


def dp_lcs(a, b) -> int:
    """Textbook O(n*m) LCS in pure Python: the reference."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def brute_force_drop(doc, tests, window, stride) -> bool:
    """The rule applied literally: every window of the document against every test item, full DP LCS."""
    n = len(doc)
    if n <= window:
        windows = [doc]
    else:
        starts = list(range(0, n - window + 1, stride))
        if starts[-1] + window < n:
            starts.append(n - window)
        windows = [doc[s:s + window] for s in starts]
    for w in windows:
        for t in tests:
            lcs = dp_lcs(w, t)
            if lcs >= 13 and lcs >= 0.6 * min(len(w), len(t)) - 1e-9:
                return True
    return False


seqs = st.lists(st.integers(0, 5), max_size=60)


@settings(max_examples=200, deadline=None)
@given(seqs, seqs)
def test_bitparallel_lcs_equals_dp(a, b):
    assert lcs_length(a, b) == dp_lcs(a, b)
    assert lcs_length_dp(a, b) == dp_lcs(a, b)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=100, max_size=300), st.lists(st.integers(0, 1000), max_size=200))
def test_lcs_wide_sequences(a, b):
    # past 64 bits the big-integer carries cross machine words
    b = b + a[10:150]
    assert lcs_length(a, b) == dp_lcs(a, b)


def test_threshold_edges():
    assert not is_contaminated(12, 1000, 12)   # below the absolute floor, even a full match
    assert is_contaminated(13, 1000, 13)
    assert is_contaminated(15, 25, 1000)      # 0.6 * 25 = 15 exactly: contaminated
    assert not is_contaminated(14, 25, 1000)
    assert is_contaminated(30, 1000, 50) and not is_contaminated(29, 1000, 50)
    assert lcs_threshold(25, 100) == 15 and lcs_threshold(10, 10) == 13 and lcs_threshold(1000, 51) == 31


def test_twelve_vs_thirteen_tokens():
    rng = random.Random(0)
    clean = [rng.randrange(1000, 2000) for _ in range(200)]
    for size, dropped in ((12, False), (13, True)):
        item = list(range(100, 100 + size))
        doc = clean[:80] + item + clean[80:]
        index = TestSetIndex([item], window=64, stride=16)
        assert (index.find(doc) is not None) == dropped
        assert brute_force_drop(doc, [item], 64, 16) == dropped


def test_exact_sixty_percent_edge():
    # test item of 25 tokens, document holds exactly 15 of them in order (plus noise): 15 >= 0.6 * 25
    item = list(range(100, 125))
    for kept_count, dropped in ((15, True), (14, False)):
        doc = [t for i, t in enumerate(item) if i < kept_count] + [900 + i for i in range(40)]
        index = TestSetIndex([item], window=64, stride=16)
        assert (index.find(doc) is not None) == dropped, kept_count


def _adversarial_cases(rng: random.Random, vocab: int):
    """(documents, test items): near-duplicates, reordered text, short items, long documents, random noise."""
    tests = [[rng.randrange(vocab) for _ in range(rng.choice([5, 12, 13, 14, 20, 30, 45]))] for _ in range(8)]
    docs = []
    for t in tests:
        edited = [x if rng.random() > 0.35 else rng.randrange(vocab) for x in t]  # near-duplicate
        docs.append([rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] + edited)
        half = len(t) // 2
        docs.append(t[half:] + t[:half])  # reordered halves
        blocks = [t[i:i + 4] for i in range(0, len(t), 4)]
        rng.shuffle(blocks)
        docs.append([x for b in blocks for x in b])  # shuffled blocks
        spread = []
        for x in t:  # the item interleaved with noise: a subsequence, no shared bigram
            spread += [x] + [rng.randrange(vocab) for _ in range(rng.randrange(0, 3))]
        docs.append(spread)
        long_doc = [rng.randrange(vocab) for _ in range(rng.randrange(100, 260))]
        at = rng.randrange(len(long_doc))
        docs.append(long_doc[:at] + t[: rng.randrange(len(t) + 1)] + long_doc[at:])  # long doc, partial copy
    docs += [[rng.randrange(vocab) for _ in range(rng.randrange(0, 120))] for _ in range(20)]
    return docs, tests


@pytest.mark.parametrize("seed", range(6))
def test_index_equals_brute_force(seed):
    rng = random.Random(seed)
    vocab = [8, 30, 500][seed % 3]  # tiny alphabets make chance LCS matches common
    docs, tests = _adversarial_cases(rng, vocab)
    window, stride = 48, 12
    index = TestSetIndex(tests, window=window, stride=stride)
    ours = [index.find(d) is not None for d in docs]
    reference = [brute_force_drop(d, tests, window, stride) for d in docs]
    assert ours == reference
    assert 0 < sum(ours) < len(docs)  # both decisions occur, so the comparison means something


def test_hit_reports_the_item_and_window():
    item = list(range(50, 80))
    doc = list(range(1000, 1100)) + item + list(range(2000, 2100))
    hit = TestSetIndex([[1, 2, 3], item], names=["short", "long"], window=64, stride=16).find(doc)
    # the first window that meets the rule (it holds 28 of the 30 tokens) is reported
    assert hit is not None and hit.test_name == "long" and hit.test_len == 30
    assert hit.lcs >= lcs_threshold(hit.window_len, 30)
    assert hit.lcs == dp_lcs(doc[hit.window_start:hit.window_start + hit.window_len], item)


def test_verbatim_copies_of_any_length_are_caught():
    rng = random.Random(3)
    for m in (13, 40, 47, 48, 60, 64, 80, 200):
        item = [rng.randrange(10_000, 20_000) for _ in range(m)]
        doc = [rng.randrange(10_000) for _ in range(rng.randrange(0, 100))] + item + [rng.randrange(10_000)
                                                                                      for _ in range(50)]
        assert TestSetIndex([item], window=64, stride=16).find(doc) is not None, m


def test_window_starts_cover_the_document():
    assert window_starts(10, 64, 16) == [0]
    assert window_starts(100, 64, 16) == [0, 16, 32, 36]
    with pytest.raises(ValueError, match="window and stride"):
        window_starts(10, 0, 1)


def test_read_test_items_names_bad_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "solution": "b", "id": "x"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: fields \['solution'\] missing"):
        read_test_items(path, ["prompt", "solution"])
    texts, names = read_test_items(path, ["prompt"], name_field="id")
    assert texts == ["a", "c"] and names[0] == "t.jsonl:x"


@pytest.mark.parametrize("seed", range(3))
def test_packed_pass_equals_per_item(seed):
    rng = random.Random(seed)
    docs, tests = _adversarial_cases(rng, 12)
    index = TestSetIndex(tests, window=48, stride=12)
    for d in docs:
        every = index.lcs_all(d[:48])
        assert every == {i: dp_lcs(d[:48], tests[i]) for i in index.active}
        assert (index.find(d, batch_over=0) is None) == (index.find(d, batch_over=10**9) is None)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=30), min_size=1, max_size=4),
       st.lists(st.integers(0, 6), max_size=90), st.data())
def test_index_equals_brute_force_hypothesis(tests, doc, data):
    # a tiny alphabet, and sometimes an item pasted into the document, so both decisions are common
    if tests[0] and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(doc)))
        doc = doc[:at] + tests[0] + doc[at:]
    index = TestSetIndex(tests, window=40, stride=10)
    assert (index.find(doc) is not None) == brute_force_drop(doc, tests, 40, 10)
