"""DeepSeek-V3.2's chat format: render conversations to text and token ids, parse what the model writes back.

    chat = ChatTemplate(tokenizer, thinking=True)
    ids = chat.encode([{"role": "user", "content": "2+2?"}], tools=schemas)   # ends with the generation prefix
    turn = chat.parse(generated_text)          # AssistantTurn(reasoning, content, tool_calls, finished, error)

The layout uses the V3-family special tokens the tokenizer carries (`dsaforge.data.tokenizer.SPECIAL_TOKENS`):

    <BOS>{system}<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{json arguments}<｜tool▁call▁end｜>...
        <｜tool▁calls▁end｜><EOS>
    <｜tool▁output▁begin｜>{tool result}<｜tool▁output▁end｜>...
    <think>{reasoning}</think>{content}<EOS>          (the same assistant turn, continued after its tool outputs)

Every assistant segment (after `<｜Assistant｜>` or after tool outputs) opens with `<think>` in thinking mode and
with `</think>` (an empty reasoning) otherwise, and ends with EOS, the one stop token. Tool schemas are described
in the system text.

Thinking context (paper §3.2.1): reasoning of assistant segments that come *before the last user message* is
dropped (rendered as `</think>`); after it, reasoning stays, so appending tool outputs never rewrites what came
before and a rollout extends its cache instead of re-prefilling. Tool calls and outputs always stay.

Messages are plain dicts: {"role": "system" | "user" | "assistant" | "tool", "content": str,
"reasoning_content": str (assistant, optional), "tool_calls": [{"name": str, "arguments": dict}] (assistant)}.
`parse` never raises: malformed output becomes an AssistantTurn with `error` set and/or ToolCalls with `error`
set, which a rollout answers with `invalid_call_observation`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from dsaforge.data.tokenizer import BOS, EOS

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
MARKERS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP,
           OUTPUT_BEGIN, OUTPUT_END)
ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation given to `render` is not well formed (unknown role, tool output without a call, ...)."""


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    error: Optional[str] = None          # set when the model's call could not be read; `arguments` is then {}

    def as_message_call(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class AssistantTurn:
    """One parsed assistant segment."""
    content: str = ""
    reasoning: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: bool = False               # the segment ended with EOS (not cut by a length limit)
    error: Optional[str] = None          # structural problem outside the tool calls (e.g. unterminated reasoning)

    def message(self) -> dict:
        """The turn as a message dict (invalid calls keep their name so the transcript shows what was tried)."""
        m: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = [c.as_message_call() for c in self.tool_calls]
        return m


def invalid_call_observation(reason: str) -> str:
    """The tool output a rollout returns for a call it could not run: the model sees why and may try again."""
    return json.dumps({"error": f"invalid tool call: {reason}"})


def tools_text(tools: Sequence[dict]) -> str:
    """The system text describing OpenAI-style function schemas and the call format."""
    lines = ["## Tools", "", "Tools you may call:"]
    for t in tools:
        f = t.get("function", t)
        lines += ["", f"### {f['name']}", f"Description: {f.get('description', '')}",
                  f"Parameters: {json.dumps(f.get('parameters', {}), sort_keys=True)}"]
    lines += ["", "To call tools, end your reply with", f"{CALLS_BEGIN}{CALL_BEGIN}NAME{SEP}ARGUMENTS{CALL_END}"
              f"{CALLS_END}", "with one call block per tool call, NAME one of the tools above and ARGUMENTS a JSON "
              "object matching its parameters. Each result comes back as a tool output."]
    return "\n".join(lines)


def _call_text(call: dict) -> str:
    return f"{CALL_BEGIN}{call['name']}{SEP}{json.dumps(call.get('arguments') or {}, ensure_ascii=False)}{CALL_END}"


class ChatTemplate:
    """Renders and parses DeepSeek-V3.2's chat format. `tokenizer` (HF `tokenizers.Tokenizer`) is needed only for
    the token-id methods."""

    def __init__(self, tokenizer=None, thinking: bool = True):
        self.tokenizer, self.thinking = tokenizer, thinking

    # ---------------------------------------------------------------- rendering
    @property
    def segment_prefix(self) -> str:
        """What opens every assistant segment; generation starts after it."""
        return THINK if self.thinking else END_THINK

    def render(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
               add_generation_prompt: bool = True) -> str:
        """The conversation as text; with add_generation_prompt it ends where the model's next segment starts."""
        msgs = list(messages)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ChatFormatError(f"message {i}: role must be one of {ROLES}, got "
                                      f"{m.get('role') if isinstance(m, dict) else type(m).__name__!r}")
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        system = "\n\n".join(str(m.get("content") or "") for m in msgs if m["role"] == "system")
        if tools:
            system = (system + "\n\n" if system else "") + tools_text(tools)
        out = [BOS, system]
        prev = None
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "system":
                continue
            if role == "user":
                out.append(USER + str(m.get("content") or ""))
            elif role == "assistant":
                if prev == "user":
                    out.append(ASSISTANT)
                elif prev == "assistant":
                    raise ChatFormatError(f"message {i}: two assistant messages in a row")
                elif prev is None:
                    raise ChatFormatError(f"message {i}: the conversation starts with an assistant message")
                out.append(self.render_assistant(m, keep_reasoning=i > last_user))
            else:   # tool
                if prev not in ("assistant", "tool"):
                    raise ChatFormatError(f"message {i}: a tool output must follow an assistant tool call")
                out.append(self.render_tool_output(m))
            prev = role
        if add_generation_prompt:
            if prev == "assistant":
                raise ChatFormatError("the conversation ends with an assistant message; nothing to generate")
            out.append(self.generation_prompt(prev or "user"))
        return "".join(out)

    def render_assistant(self, m: dict, keep_reasoning: bool = True) -> str:
        """One assistant segment, from its prefix to EOS."""
        # Kept segments open with the same prefix the model generated after (a missing reasoning is empty).
        head = f"{THINK}{m.get('reasoning_content') or ''}{END_THINK}" if (self.thinking and keep_reasoning) \
            else END_THINK
        calls = m.get("tool_calls") or []
        tail = (CALLS_BEGIN + "".join(_call_text(_plain_call(c)) for c in calls) + CALLS_END) if calls else ""
        return head + str(m.get("content") or "") + tail + EOS

    @staticmethod
    def render_tool_output(m: dict) -> str:
        content = m.get("content")
        return OUTPUT_BEGIN + (content if isinstance(content, str) else json.dumps(content)) + OUTPUT_END

    def generation_prompt(self, after: str) -> str:
        """Text between the last message and the model's next segment: after a user message the assistant tag and
        the segment prefix; after tool outputs the prefix alone (the same turn continues)."""
        return (ASSISTANT if after == "user" else "") + self.segment_prefix

    def continuation(self, tool_messages: Sequence[dict]) -> str:
        """What a rollout appends after a segment that called tools: the outputs, then the next segment's prefix."""
        return "".join(self.render_tool_output(m) for m in tool_messages) + self.generation_prompt("tool")

    # ---------------------------------------------------------------- tokens
    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this ChatTemplate has no tokenizer; pass one to use the token-id methods")
        return self.tokenizer

    def encode(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
               add_generation_prompt: bool = True) -> list[int]:
        return self.encode_text(self.render(messages, tools, add_generation_prompt))

    def encode_text(self, text: str) -> list[int]:
        return self._tok().encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok().decode(list(ids), skip_special_tokens=False)

    def eos_id(self) -> int:
        i = self._tok().token_to_id(EOS)
        if i is None:
            raise ValueError(f"the tokenizer has no {EOS} token")
        return i

    # ---------------------------------------------------------------- parsing
    def parse(self, text: str) -> AssistantTurn:
        """Parse one generated segment (the text after `segment_prefix`). Never raises."""
        try:
            return self._parse(text if isinstance(text, str) else str(text))
        except Exception as e:  # the parser's contract: malformed output is data, never a crash
            return AssistantTurn(content="", error=f"unparseable output ({type(e).__name__})")

    def _parse(self, text: str) -> AssistantTurn:
        turn = AssistantTurn()
        if EOS in text:
            text, turn.finished = text[:text.index(EOS)], True
        if self.thinking:
            if END_THINK in text:
                turn.reasoning, text = text.split(END_THINK, 1)
            else:
                turn.reasoning, text = text, ""
                turn.error = "reasoning not closed with </think>"
        elif text.startswith(END_THINK):
            text = text[len(END_THINK):]
        if CALLS_BEGIN not in text:
            turn.content = text
            stray = next((m for m in (CALL_BEGIN, CALL_END, SEP, CALLS_END) if m in text), None)
            if stray:
                turn.tool_calls.append(ToolCall("", {}, f"{stray} outside a {CALLS_BEGIN} block"))
            return turn
        turn.content, rest = text.split(CALLS_BEGIN, 1)
        closed = CALLS_END in rest
        body = rest.split(CALLS_END, 1)[0] if closed else rest
        pieces = body.split(CALL_BEGIN)
        if pieces[0].strip():
            turn.tool_calls.append(ToolCall("", {}, f"unexpected text {pieces[0][:40]!r} before {CALL_BEGIN}"))
        for piece in pieces[1:]:
            turn.tool_calls.append(_parse_call(piece))
        if not closed:
            # A block cut off (by the length limit, say): none of its calls runs, complete-looking ones included.
            turn.tool_calls = [ToolCall(c.name, {}, c.error or f"{CALLS_END} missing (output cut off)")
                               for c in turn.tool_calls] or [ToolCall("", {}, f"{CALLS_END} missing")]
        elif not turn.tool_calls:
            turn.tool_calls.append(ToolCall("", {}, f"empty {CALLS_BEGIN} block"))
        return turn


def _plain_call(c: dict) -> dict:
    """Accept our {"name", "arguments"} and OpenAI's {"function": {"name", "arguments": json}}."""
    if "function" in c:
        f = c["function"]
        args = f.get("arguments") or {}
        return {"name": f["name"], "arguments": json.loads(args) if isinstance(args, str) else args}
    return c


def _parse_call(piece: str) -> ToolCall:
    if CALL_END not in piece:
        name = piece.split(SEP, 1)[0].strip()
        return ToolCall(name, {}, f"{CALL_END} missing")
    piece = piece.split(CALL_END, 1)[0]
    if SEP not in piece:
        return ToolCall(piece.strip(), {}, f"{SEP} missing between the tool name and its arguments")
    name, raw = piece.split(SEP, 1)
    name = name.strip()
    if not name:
        return ToolCall("", {}, "empty tool name")
    if any(m in name or m in raw for m in MARKERS):
        return ToolCall(name, {}, "special tokens inside a tool call")
    raw = raw.strip()
    if raw.startswith("```"):     # V3's fenced form: ```json\n{...}\n```
        raw = raw.strip("`").removeprefix("json").strip()
    try:
        args = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        return ToolCall(name, {}, f"arguments are not valid JSON ({e.msg} at {e.pos})")
    if not isinstance(args, dict):
        return ToolCall(name, {}, f"arguments must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args)
