"""Prompts in, text out: chat templating with user text kept as text, and incremental detokenisation."""
from __future__ import annotations

import re

from .models import ColmError


def encode_prompt(tok, prompt, chat: bool | None = None, max_prompt_tokens: int = 4096) -> list[int]:
    """Chat messages (or a str, when the tokenizer has a chat template) -> token ids.

    Prompt text is always tokenised as text: a user typing ``<|im_start|>`` gets those characters, not the
    control token, so a prompt cannot forge turns of the conversation.
    """
    if isinstance(prompt, str):
        prompt = clean_text(prompt)
        if not prompt.strip():
            raise ColmError("the prompt is empty")
        use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
        messages = [{"role": "user", "content": prompt}] if use_chat else None
    else:
        messages = [{**m, "content": clean_text(str(m.get("content", "")))} for m in prompt]
        if not messages or not any(str(m.get("content", "")).strip() for m in messages):
            raise ColmError("the prompt is empty")
    if messages is None:
        ids = tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    else:
        # Render the template around placeholders, then splice in the user text tokenised as plain text.
        ids = _chat_ids(tok, messages)
    if len(ids) > max_prompt_tokens:
        raise ColmError(f"the prompt is {len(ids)} tokens; the limit is {max_prompt_tokens}")
    return ids


def clean_text(text: str) -> str:
    """Make any Python str encodable: lone UTF-16 surrogates (which JSON clients can send) become U+FFFD;
    everything else, control characters included, is kept and tokenised as text."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_max_new(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ColmError(f"max_new_tokens must be a positive integer, got {n!r}")
    return n


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    """Apply the chat template with user text tokenised as plain text (special-token strings stay literal)."""
    marks = [f"\x00COLM{i}\x00" for i in range(len(messages))]
    templated = tok.apply_chat_template(
        [{**m, "content": mk} for m, mk in zip(messages, marks)], tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    rest = templated
    for m, mk in zip(messages, marks):
        before, _, rest = rest.partition(mk)
        ids += tok(before, add_special_tokens=False)["input_ids"]
        ids += tok(str(m.get("content", "")), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tok(rest, add_special_tokens=False)["input_ids"]
    return ids


class Detok:
    """Incremental detokenisation, so multi-byte characters split across tokens print whole and the step texts
    concatenate to the decoded answer."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        new = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev):]
        return ""

    @classmethod
    def resume(cls, tokenizer, steps) -> "Detok":
        """The state a fresh pass over ``steps`` leaves (re-decode).  Anchors move only at steps that emitted
        text, so the bytes of a character still incomplete at the branch point come out with the token that
        completes it, exactly as in a full decode."""
        d = cls(tokenizer)
        d.ids = [s.token_id for s in steps]
        emitted = [i + 1 for i, s in enumerate(steps) if s.text]
        d.read = emitted[-1] if emitted else 0
        d.prefix = emitted[-2] if len(emitted) > 1 else 0
        return d


# The shared instruction (colm.data.INSTRUCTION) asks for a final line "#### <number>": once such a line is complete
# the answer is over, whichever model wrote it.  Without this, a 512-token budget is spent on restating the result.
ANSWER_LINE = re.compile(r"####[^\n]*\d")


def ends_answer_line(texts: list[str]) -> bool:
    """texts: the decoded pieces of an answer so far.  True when the newest piece completes (with a newline) a line
    holding '#### <number>'.  Reads back only to the start of the lines the newest piece ends."""
    newest = texts[-1] if texts else ""
    ended = newest.count("\n")
    if not ended:
        return False
    tail = [newest]
    for t in reversed(texts[:-1]):   # back to the newline before the newest piece
        tail.append(t)
        if "\n" in t:
            break
    text = "".join(reversed(tail))
    lines = text[:text.rindex("\n")].split("\n")
    return any(ANSWER_LINE.search(line) for line in lines[-ended:])
