"""A request's completion as text: tokens decoded incrementally (Detokenizer), and stop sequences (TextStream).

Text is handed out as it is decoded, except what could still be the start of a stop sequence (held back until
the next token says) and half a UTF-8 character; a stop sequence ends the completion, without the stop.
"""

from __future__ import annotations


class Detokenizer:
    """Incremental detokenization, as vLLM's detokenize_incrementally: each step decodes only the tokens since
    `prefix` (a few), twice: up to `read` (the text already given out) and up to the newest token; the new text is
    the difference. A window that ends in half a UTF-8 character ("\ufffd") waits for the next token (except the
    final step). The pieces add up to tokenizer.decode(ids, skip_special_tokens=True) of the whole list (tested),
    at a cost per token that does not grow with the completion."""

    def __init__(self):
        self.ids: list[int] = []
        self.prefix = self.read = 0  # token offsets: the window starts at prefix; text up to read was given out

    def step(self, tokenizer, final: bool = False) -> str:
        if self.read == len(self.ids):
            return ""
        before = tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing printable yet (a special token, or half a character)
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class TextStream:
    """One request's text as it grows: push() each new token and get the text to send now, and whether a stop
    sequence ended it. The pieces add up to the whole decode cut before its first stop sequence (tested)."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.detok = Detokenizer()
        self.text = ""  # the completion decoded so far
        self.sent = 0  # characters of it already handed out

    def push(self, tokenizer, token: int | None, final: bool = False) -> tuple[str, bool]:
        """Add `token` (None: nothing to decode, e.g. an end-of-sequence token); the text to send and whether a stop
        sequence was found (then the text ends before it). `final`: the last token, nothing is held back."""
        if token is not None:
            self.detok.ids.append(token)
        self.text += self.detok.step(tokenizer, final)
        text = self.text
        # the earliest stop in the text wins, whatever the order of the list (two may arrive with one token)
        found = [at for stop in self.stops if (at := text.find(stop, max(0, self.sent - len(stop) + 1))) >= 0]
        if found:
            at = min(found)
            out, self.sent = text[self.sent:at], at
            return out, True
        if final:
            end = len(text)
        else:
            end = len(text) - max((len(s) - 1 for s in self.stops), default=0)
            end = end - 1 if text[end - 1:end] == "\ufffd" else end
        out = text[self.sent:max(end, self.sent)]
        self.sent += len(out)
        return out, False


__all__ = ["Detokenizer", "TextStream"]
