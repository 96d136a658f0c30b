"""Byte-level BPE primitives: the GPT-2 byte-to-unicode map, the two ways of applying merges, and the check
that tells when they agree.

HF `tokenizers` applies a *merge list*: inside a pre-token it repeatedly joins the adjacent pair with the lowest
merge index (leftmost on ties), and only pairs that are in the list. `tiktoken` applies *ranks*: it joins the
adjacent pair whose concatenation is a token with the lowest id, whatever pair it came from, and returns a whole
pre-token at once when it is a token. The two agree on every input when the merge list is "derived from the ranks":

  1. merge i creates a token whose id increases with i (so both orders are the same), one merge per token, and
     every multi-byte token has its merge;
  2. the merge listed for token t (id r) is exactly where rank merging of t's own bytes stops when it may only
     use tokens with ids below r.

Why that suffices: suppose rank merging, inside some pre-token, joins x + y = t. Until then every join inside
t's span happened in the same order as rank merging of t alone (joins outside the span do not touch it), and
none of them used an id above r: the first such join would need every pair present to rank above it, yet the
span then is already the two-part split of condition 2, whose pair ranks r. So the span is that split, the
pair (x, y) is t's listed merge, and both algorithms take the same step. A whole pre-token that is a token t
is also what merge-list BPE reaches (it merges t's bytes into the listed pair, then into t). `check_rank_merging`
verifies both conditions; the tokenizer uses tiktoken only for vocabularies that pass it. Qwen's vocabulary
passes (its merges were derived from tiktoken ranks), and `derive_merges` makes trained vocabularies pass.
"""

from __future__ import annotations

from functools import lru_cache

_NO_RANK = 1 << 62  # above every rank


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_unicode`."""
    return {c: b for b, c in byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _translations() -> tuple[dict[int, int], dict[int, int]]:
    """str.translate tables: byte-level character <-> the Latin-1 character of its byte (fast conversions)."""
    to_latin1 = {ord(c): b for b, c in byte_to_unicode().items()}
    return to_latin1, {b: ord(c) for b, c in byte_to_unicode().items()}


def token_to_bytes(token: str) -> bytes | None:
    """The bytes a byte-level vocabulary string stands for, or None if it has a character outside the alphabet."""
    if not all(c in unicode_to_byte() for c in token):
        return None
    return token.translate(_translations()[0]).encode("latin-1")


def tokens_to_bytes(tokens: list[str]) -> list[bytes] | None:
    """token_to_bytes of many tokens at C speed; None if any has a character outside the alphabet."""
    if not set("".join(tokens)) <= unicode_to_byte().keys():
        return None
    table = _translations()[0]
    return [t.translate(table).encode("latin-1") for t in tokens]


def bytes_to_token(data: bytes) -> str:
    """The byte-level vocabulary string of some bytes."""
    return data.decode("latin-1").translate(_translations()[1])


def bytes_to_tokens(items: list[bytes]) -> list[str]:
    """bytes_to_token of many byte strings."""
    table = _translations()[1]
    return [b.decode("latin-1").translate(table) for b in items]


def merge_by_rank(piece: bytes, ranks: dict[bytes, int], below: int | None = None) -> list[bytes]:
    """tiktoken's rule: join the adjacent pair whose concatenation has the lowest rank, until none is a token
    (only tokens with rank < `below` count when it is given). Short pieces only: O(n^2)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    limit = _NO_RANK if below is None else below
    while len(parts) > 1:
        best, where = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts


def merge_by_list(ids: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """HF `tokenizers`' rule: join the adjacent pair with the lowest merge index (leftmost on ties), only
    pairs in the list. `merges` maps (left id, right id) -> (merge index, new id)."""
    ids = list(ids)
    while len(ids) > 1:
        best = None
        for i in range(len(ids) - 1):
            found = merges.get((ids[i], ids[i + 1]))
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], i, found[1])
        if best is None:
            break
        _, i, new_id = best
        ids[i:i + 2] = [new_id]
    return ids


def check_rank_merging(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                       max_problems: int = 5) -> list[str]:
    """Why rank merging (tiktoken) might differ from merge-list BPE on this vocabulary: an empty list means it
    cannot (see the module docstring for the argument)."""
    problems: list[str] = []

    def problem(text: str) -> bool:
        problems.append(text)
        return len(problems) >= max_problems

    merged_into: dict[bytes, int] = {}
    previous = -1
    for index, (left, right) in enumerate(merges):
        token = left + right
        rank = ranks.get(token)
        if rank is None or left not in ranks or right not in ranks:
            if problem(f"merge {index} ({left!r} + {right!r}) uses or makes a token missing from the vocabulary"):
                return problems
            continue
        if token in merged_into:
            if problem(f"token {token!r} is made by two merges ({merged_into[token]} and {index})"):
                return problems
            continue
        merged_into[token] = index
        if rank <= previous:
            if problem(f"merge {index} makes id {rank}, not above the previous merge's id {previous}: "
                       "merge order differs from id order"):
                return problems
        previous = max(previous, rank)
        if len(token) > 2 and merge_by_rank(token, ranks, below=rank) != [left, right]:
            if problem(f"merge {index} ({left!r} + {right!r}) is not where rank merging of {token!r} stops"):
                return problems
    for token in ranks:
        if len(token) > 1 and token not in merged_into:
            if problem(f"token {token!r} (id {ranks[token]}) has no merge"):
                return problems
    return problems


def derive_merges(ranks: dict[bytes, int]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The merge list derived from ranks (condition 2 of the module docstring), in id order, and the tokens
    rank merging can never make (which must be dropped from the vocabulary for the two rules to agree)."""
    reachable: dict[bytes, int] = {}
    merges: list[tuple[bytes, bytes]] = []
    unreachable: list[bytes] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            reachable[token] = rank
            continue
        parts = merge_by_rank(token, reachable, below=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
            reachable[token] = rank
        else:
            unreachable.append(token)
    return merges, unreachable
