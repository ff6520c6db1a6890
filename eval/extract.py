"""Answer extraction from model output: what a verifier is given, and nothing else of the text.

Order of preference (the last occurrence wins inside each rule, since models restate and correct themselves):
1. reasoning is dropped: everything up to the last `</think>`; an unterminated `<think>` means no answer yet;
2. `<answer>...</answer>` (reasoning-gym's prompt convention);
3. `\\boxed{...}` with balanced braces (math convention);
4. "answer is X" / "answer: X" on one line;
5. the last non-empty line.
Code extraction takes the first fenced block (```python or ```), else the text as given.
"""
from __future__ import annotations

import re
from typing import Optional

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.I)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def strip_thinking(text: str) -> Optional[str]:
    """Text after the reasoning; None when a `<think>` block was opened and never closed (output cut mid-thought)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (nested braces kept), None when there is none or it is unbalanced."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The answer a verifier should see, stripped; None when the output holds no answer at all."""
    if text is None:
        return None
    body = strip_thinking(text)
    if body is None:
        return None
    tags = _ANSWER_TAG.findall(body)
    if tags:
        return tags[-1].strip()
    box = boxed(body)
    if box is not None:
        return box.strip()
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _ANSWER_IS.search(line)
        if m:
            return m.group(1).strip().rstrip(".").strip()
    return lines[-1] if lines else None


def extract_code(text: str) -> str:
    """The first fenced code block's body (an unterminated fence runs to the end), else the text unchanged."""
    body = strip_thinking(text)
    if body is None:
        return ""
    m = _FENCE.search(body)
    return m.group(2) if m else body


# Codex/HumanEval stop sequences: a completion of one function body ends where top-level code begins.
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")


def cut_at_stops(text: str, stops=HUMANEVAL_STOPS) -> str:
    """Text up to the first of the stop strings (a function-body completion ends at top-level code)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
