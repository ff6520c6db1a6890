"""DeepSeek-V3.2 chat format: round trips, the thinking-context rule, token-level consistency, and a fuzz of the
parser on random and truncated text."""
import json
import random

import pytest

from dsaforge.data import chat as C
from dsaforge.data.chat import AssistantTurn, ChatFormatError, ChatTemplate
from dsaforge.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

TOOLS = [{"type": "function", "function": {"name": "search", "description": "BM25 search.",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog {\"query\": \"x\"} 12345"] * 50
    return train_tokenizer(texts, vocab_size=400)


ASSISTANTS = [
    {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "2+2 is 4."},
    {"role": "assistant", "content": "", "reasoning_content": "look it up",
     "tool_calls": [{"name": "search", "arguments": {"query": "Zen Tower built by"}},
                    {"name": "open_document", "arguments": {"doc_id": "a/b/3", "n": [1, 2.5, None, True]}}]},
    {"role": "assistant", "content": "multi\nline ünïcode 東京", "reasoning_content": ""},
    {"role": "assistant", "content": "calls without reasoning", "tool_calls": [{"name": "f", "arguments": {}}]},
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("msg", ASSISTANTS)
def test_assistant_segment_round_trips(msg, thinking):
    chat = ChatTemplate(thinking=thinking)
    text = chat.render_assistant(msg)
    assert text.startswith(chat.segment_prefix) or not thinking
    generated = text[len(chat.segment_prefix):] if text.startswith(chat.segment_prefix) else text
    turn = chat.parse(generated)
    assert turn.error is None and turn.finished
    assert turn.content == msg["content"]
    assert [c.as_message_call() for c in turn.tool_calls] == msg.get("tool_calls", [])
    if thinking and msg.get("reasoning_content") is not None:
        assert turn.reasoning == msg["reasoning_content"]
    # and the parsed turn renders back to the same text
    assert chat.render_assistant(turn.message()) == text


def _transcript():
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who built the Zen Tower?"},
        {"role": "assistant", "content": "", "reasoning_content": "R1",
         "tool_calls": [{"name": "search", "arguments": {"query": "Zen Tower"}}]},
        {"role": "tool", "content": "[{\"id\": \"d1\"}]"},
        {"role": "assistant", "content": "Vokal Works.", "reasoning_content": "R2"},
        {"role": "user", "content": "And when?"},
        {"role": "assistant", "content": "", "reasoning_content": "R3",
         "tool_calls": [{"name": "search", "arguments": {"query": "Vokal Works established"}}]},
        {"role": "tool", "content": "1901"},
        {"role": "assistant", "content": "1901.", "reasoning_content": "R4"},
    ]


def test_thinking_context_rule():
    """Reasoning is dropped only for segments before the last user message; tool calls and outputs stay."""
    chat = ChatTemplate(thinking=True)
    msgs = _transcript()
    text = chat.render(msgs, add_generation_prompt=False)
    assert "R1" not in text and "R2" not in text                 # before the second user message: dropped
    assert f"{C.THINK}R3{C.END_THINK}" in text and f"{C.THINK}R4{C.END_THINK}" in text
    assert text.count(C.CALL_BEGIN) == 2 and text.count(C.OUTPUT_BEGIN) == 2    # every call and output kept
    assert "Zen Tower" in text and "[{\"id\": \"d1\"}]" in text
    # Only tool outputs appended: the earlier text (with reasoning) is a prefix of the later one, so a rollout
    # extends its cache instead of re-prefilling.
    upto_call = chat.render(msgs[:7], add_generation_prompt=False)
    with_output = chat.render(msgs[:8], add_generation_prompt=True)
    assert f"{C.THINK}R3{C.END_THINK}" in upto_call and with_output.startswith(upto_call)
    assert with_output == upto_call + chat.continuation([msgs[7]])
    # A new user message: the earlier reasoning disappears from the rendering.
    before = chat.render(msgs[:5], add_generation_prompt=False)
    after = chat.render(msgs[:6], add_generation_prompt=True)
    assert "R2" in before and "R2" not in after and not after.startswith(before)
    # Non-thinking mode never shows reasoning.
    assert "R3" not in ChatTemplate(thinking=False).render(msgs, add_generation_prompt=False)


def test_render_layout_and_generation_prompt():
    chat = ChatTemplate(thinking=True)
    text = chat.render([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert text.startswith(C.BOS) and text.endswith(C.USER + "hi" + C.ASSISTANT + C.THINK)
    assert "### search" in text and json.dumps(TOOLS[0]["function"]["parameters"], sort_keys=True) in text
    assert ChatTemplate(thinking=False).render([{"role": "user", "content": "hi"}]).endswith(C.ASSISTANT + C.END_THINK)


@pytest.mark.parametrize("bad, why", [
    ([{"role": "robot", "content": "x"}], "role must be"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "tool output must follow"),
    ([{"role": "assistant", "content": "x"}], "starts with an assistant"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "ends with an assistant"),
])
def test_render_rejects_malformed_conversations(bad, why):
    with pytest.raises(ChatFormatError, match=why):
        ChatTemplate().render(bad)


def test_token_ids_follow_the_text(tokenizer):
    chat = ChatTemplate(tokenizer, thinking=True)
    msgs = _transcript()
    for m in SPECIAL_TOKENS:
        assert tokenizer.token_to_id(m) is not None
    ids = chat.encode(msgs[:8])
    assert chat.decode(ids) == chat.render(msgs[:8])
    # Pieces split at special tokens tokenize to the same ids as the whole: appending a continuation's ids to a
    # cache is the same as encoding the longer conversation.
    head = chat.encode(msgs[:7], add_generation_prompt=False)
    assert head + chat.encode_text(chat.continuation([msgs[7]])) == ids
    assert ids.count(chat.eos_id()) == 3      # one per assistant segment


@pytest.mark.parametrize("text, want", [
    ("no close tag at all", "reasoning not closed"),
    (f"r{C.END_THINK}x{C.CALLS_BEGIN}{C.CALL_BEGIN}search{C.SEP}{{bad json{C.CALL_END}{C.CALLS_END}", "not valid JSON"),
    (f"r{C.END_THINK}{C.CALLS_BEGIN}{C.CALL_BEGIN}search{C.SEP}[1, 2]{C.CALL_END}{C.CALLS_END}", "JSON object"),
    (f"r{C.END_THINK}{C.CALLS_BEGIN}{C.CALL_BEGIN}search{{\"q\": 1}}{C.CALL_END}{C.CALLS_END}", "missing between"),
    (f"r{C.END_THINK}{C.CALLS_BEGIN}{C.CALL_BEGIN}{C.SEP}{{}}{C.CALL_END}{C.CALLS_END}", "empty tool name"),
    (f"r{C.END_THINK}{C.CALLS_BEGIN}{C.CALL_BEGIN}search{C.SEP}{{\"query\": \"a\"}}", "missing"),
    (f"r{C.END_THINK}{C.CALLS_BEGIN}{C.CALLS_END}", "empty"),
    (f"r{C.END_THINK}text {C.CALL_BEGIN}x{C.SEP}{{}}{C.CALL_END}", "outside a"),
])
def test_malformed_output_parses_to_invalid_calls(text, want):
    turn = ChatTemplate(thinking=True).parse(text)
    errors = [turn.error] + [c.error for c in turn.tool_calls]
    assert any(e and want in e for e in errors), errors
    obs = json.loads(C.invalid_call_observation(next(e for e in errors if e)))
    assert obs["error"].startswith("invalid tool call")


def test_fenced_arguments_are_accepted():
    turn = ChatTemplate(thinking=False).parse(
        f"{C.CALLS_BEGIN}{C.CALL_BEGIN}f{C.SEP}```json\n{{\"a\": 1}}\n```{C.CALL_END}{C.CALLS_END}{C.EOS}")
    assert turn.tool_calls[0].arguments == {"a": 1} and turn.tool_calls[0].error is None


def test_parser_fuzz_random_and_truncated_text():
    rng = random.Random(0)
    alphabet = list(C.MARKERS) + list("ab {}[]\":,\n`") + ["search", "{\"q\": 1}", "json"]
    for thinking in (True, False):
        chat = ChatTemplate(thinking=thinking)
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            turn = chat.parse(text)
            assert isinstance(turn, AssistantTurn)
            for c in turn.tool_calls:
                assert isinstance(c.arguments, dict) and isinstance(c.name, str)
                assert c.error is None or c.arguments == {}
            json.dumps(turn.message())                  # always serialisable
        for msg in ASSISTANTS:
            full = chat.render_assistant(msg)[len(chat.segment_prefix):] if thinking else chat.render_assistant(msg)
            for cut in range(len(full) + 1):
                turn = chat.parse(full[:cut])
                assert isinstance(turn, AssistantTurn)
                if cut < len(full):
                    # a cut segment is never mistaken for a finished one, and a cut call never runs
                    assert not turn.finished or full[:cut].endswith(C.EOS)
                    if msg.get("tool_calls") and C.CALLS_END not in full[:cut]:
                        assert all(c.error for c in turn.tool_calls)
    assert ChatTemplate(thinking=False).parse(None).content == "None"   # a wrong type still parses
