"""Rows of a dataset, rendered as text segments that do or do not carry loss: a pure function.

Contract: `segments(row, fmt, template)` turns one row of `data.format` into [(text, completion)]:
the text in order, each part marked True when it is the completion (prompt_completion's
`completion`, alpaca's `output`, chat's assistant turns from their content to the end of the turn,
end-of-turn tokens included) and False otherwise (prompts, instructions, role headers, other
turns); a text row is one completion part. A row that cannot be trained on raises `BadRow` with a
short reason from `REASONS` (counted, never fatal), or `BLANK` (an empty text document, skipped
without counting). `ChatTemplate(source, bos, eos)` renders chat `messages` with a Jinja template
in a sandbox, as Hugging Face tokenizers do.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
# Every reason a row is left out, in the order the launch output names them.
REASONS = (
    "missing field",
    "not text",
    "empty text",
    "empty completion",
    "wrong role",
    "no assistant turn",
    "template error",
    "no trained tokens",
    "too long",
)
BLANK = "blank"  # an empty text document: skipped, never called bad
ALPACA = (
    "Below is an instruction that describes a task{inputs}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class BadRow(Exception):
    """A row left out of training; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing field", key)
    v = row[key]
    if not isinstance(v, str):
        raise BadRow("not text", key)
    if not allow_empty and not v.strip():
        raise BadRow("empty completion" if key in ("completion", "output") else "empty text", key)
    return v


def segments(row: dict, fmt: str, template: ChatTemplate | None = None) -> list[tuple[str, bool]]:
    if fmt == "text":
        text = _text(row, "text", allow_empty=True)
        if not text.strip():  # a blank line between documents: not a mistake, not counted
            raise BadRow(BLANK)
        return [(text, True)]
    if fmt == "prompt_completion":
        return [(_text(row, "prompt", allow_empty=True), False), (_text(row, "completion"), True)]
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("not text", "input")
        prompt = ALPACA.format(
            inputs=", paired with an input that provides further context" if extra else "",
            instruction=instruction,
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return [(prompt, False), (output, True)]
    if fmt == "chat":
        if template is None:
            raise ValueError("format chat needs a chat template")
        return template.segments(_messages(row))
    raise ValueError(f"unknown data.format {fmt!r}")


def _messages(row: dict) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRow("missing field", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m:
            raise BadRow("missing field", "role")
        if m["role"] not in ROLES:
            raise BadRow("wrong role", str(m["role"])[:40])
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRow("not text" if content is not None else "missing field", "content")
        if m["role"] == "assistant" and not content.strip():
            raise BadRow("empty completion", "assistant content")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant turn")
    return out


class ChatTemplate:
    """A Jinja chat template, compiled once, rendered in a sandbox (as Hugging Face does)."""

    def __init__(self, source: str, bos: str = "", eos: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template, self.bos, self.eos = env.from_string(source), bos, eos

    def render(self, messages: list[dict], **kw: Any) -> str:
        try:
            return self.template.render(
                messages=messages, bos_token=self.bos, eos_token=self.eos, **kw
            )
        except Exception as e:  # a template may refuse a conversation (raise_exception)
            raise BadRow("template error", str(e)[:80]) from None

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The conversation rendered turn by turn: each turn's text is what rendering it adds to
        the rendering of the turns before it; an assistant turn is a completion from its content
        on (its role header is prompt)."""
        out: list[tuple[str, bool]] = []
        before = ""
        for k in range(1, len(messages) + 1):
            text = self.render(messages[:k])
            if not text.startswith(before):  # the template rewrites earlier turns: mark contents
                return self._by_content(text, messages)
            turn, before = text[len(before) :], text
            m = messages[k - 1]
            at = turn.find(m["content"]) if m["role"] == "assistant" else -1
            if at < 0:
                out.append((turn, False))
            else:
                out += [(turn[:at], False), (turn[at:], True)]
        return [(t, c) for t, c in out if t]

    def _by_content(self, text: str, messages: list[dict]) -> list[tuple[str, bool]]:
        out, pos = [], 0
        for m in messages:
            at = text.find(m["content"], pos)
            if at < 0:
                continue
            if m["role"] == "assistant":
                out += [(text[pos:at], False), (m["content"], True)]
                pos = at + len(m["content"])
        out.append((text[pos:], False))
        return [(t, c) for t, c in out if t]
