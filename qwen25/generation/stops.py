"""Stop strings: the text of a sequence decoded as it grows, and where a stop string first appears in it.

The engine asks a request's `should_stop(tokens)` after every token; a TextTracker is that check for stop
strings (the server and the eval harness both use it), and it also releases the text that is safe to show.
"""

from __future__ import annotations


class TextTracker:
    """Decodes a request's tokens incrementally and finds stop strings. Text that may still turn into a stop
    string is held back, so a stop string never reaches the client, not even partly.

    Called with the tokens generated so far (the engine's Request.should_stop), it takes the new ones and says
    whether a stop string has appeared. Works with any tokenizer: `decode_stream` where it has one, else the
    tail of `decode` over everything so far.
    """

    def __init__(self, tokenizer, stop: list[str]):
        stream = getattr(tokenizer, "decode_stream", None)
        self.decoder = stream(skip_special_tokens=True) if stream else _Redecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text, self.sent, self.stop_at, self.seen = "", 0, None, 0

    def __call__(self, tokens: list[int]) -> bool:
        """Add the tokens not seen yet; True once a stop string has appeared."""
        for token in tokens[self.seen:]:
            self.add(token)
        self.seen = len(tokens)
        return self.stop_at is not None

    def add(self, token: int) -> bool:
        """Append a token's text; True once a stop string has appeared (the text is cut before it)."""
        old = len(self.text)
        self.text += self.decoder.step(token)
        if self.stop and self.stop_at is None:
            longest = max(map(len, self.stop))
            window_start = max(0, old - longest + 1)
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = min(hits)
        return self.stop_at is not None

    def release(self, final: bool = False) -> str:
        """Text not sent yet that is safe to send (all of it when final)."""
        if final and self.stop_at is None:
            self.text += self.decoder.flush()
        if self.stop_at is not None:
            end = self.stop_at
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.stop)
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(text), len(stop) - 1), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


class _Redecoder:
    """decode_stream for a tokenizer with only `decode`: decodes a short window of the last tokens (from the token
    before the last emitted text on, as HF's streamers and vLLM do) and returns its new tail once it no longer ends
    in an incomplete character. Linear in the output: each call decodes a few tokens, not everything so far."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read] decode to text already returned (context for the next)

    def step(self, token: int) -> str:
        self.ids.append(token)
        return self._new(final=False)

    def flush(self) -> str:
        return self._new(final=True)

    def _new(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
