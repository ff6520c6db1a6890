"""Multi-turn rollouts: the in-process engine on a model that writes malformed tool calls all the time (nothing
crashes, windows stay consistent with the chat format, context strategies reset windows), and the OpenAI backend
against a local server speaking the protocol (tool outputs and kept reasoning reach the server, turn limit,
context resets, an unreachable server)."""
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dsaforge.data import chat as C
from dsaforge.data.chat import ChatTemplate
from dsaforge.data.tokenizer import train_tokenizer
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams
from dsaforge.rollout import EnginePolicy, RolloutConfig, run_episodes, trim_messages
from dsaforge.rollout.openai import OpenAIPolicy
from dsaforge.synth.episode import _json_object
from dsaforge.synth.llm import LLMError
from dsaforge.synth.task import Verdict
from tests.model.model_helpers import make_model

ECHO = [{"type": "function", "function": {"name": "echo", "description": "Echo text.",
                                          "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


@dataclass
class _Task:
    task_id: str
    agent_class: str = "general"


class EchoEpisode:
    """A light episode (no sandbox) with the Episode interface: `echo` returns its text; the answer must equal
    the first echoed text."""

    def __init__(self, i):
        self.task, self.tools, self.calls, self.closed = _Task(f"echo-{i}"), ECHO, [], False

    def reset(self):
        self.calls = []
        return [{"role": "system", "content": "Echo things."}, {"role": "user", "content": "Echo a word, then answer it."}]

    def step(self, call):
        from dsaforge.data.chat import ToolCall, invalid_call_observation
        if isinstance(call, ToolCall):
            if call.error:
                return invalid_call_observation(call.error)
            call = call.as_message_call()
        if call.get("name") != "echo":
            return invalid_call_observation(f"unknown tool {call.get('name')!r}")
        self.calls.append(call)
        return json.dumps({"echo": call["arguments"].get("text", "")})

    def submission_from_text(self, text):
        return _json_object(text)

    def submit(self, sub):
        want = self.calls[0]["arguments"].get("text") if self.calls else None
        ok = isinstance(sub, dict) and want is not None and sub.get("answer") == want
        return Verdict(ok, float(ok), "")

    def close(self):
        self.closed = True


def test_trim_messages_strategies():
    head = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    turns = []
    for i in range(4):
        turns += [{"role": "assistant", "content": "", "reasoning_content": f"R{i}",
                   "tool_calls": [{"name": "echo", "arguments": {"text": str(i)}}]},
                  {"role": "tool", "content": f"out{i}"}]
    msgs = head + turns
    assert trim_messages(msgs, "discard_all") == head
    assert trim_messages(msgs, "discard_75") == head + turns[6:]
    kept = trim_messages(msgs, "reprefill")
    assert len(kept) == len(msgs) and not any("reasoning_content" in m for m in kept)
    assert [m.get("tool_calls") for m in kept] == [m.get("tool_calls") for m in msgs]
    with pytest.raises(ValueError, match="context"):
        RolloutConfig(context="summarise")


@pytest.fixture(scope="module")
def tokenizer():
    text = open(C.__file__).read()
    return train_tokenizer([text] * 4, vocab_size=600)


def _babbler(tokenizer):
    """A random model whose head favours the chat format's special tokens, so it writes malformed tool calls,
    unclosed reasoning and stray markers all the time."""
    model = make_model(seed=7, vocab_size=tokenizer.get_vocab_size(), index_topk=16, max_seq_len=1024, original_seq_len=1024)
    special = [tokenizer.token_to_id(t) for t in (C.END_THINK, C.CALLS_BEGIN, C.CALL_BEGIN, C.SEP, C.CALL_END,
                                                  C.CALLS_END, C.EOS, "{", "}", '"')]
    with torch.no_grad():
        model.head.weight[[s for s in special if s is not None]] *= 6.0
        model.head.weight[tokenizer.token_to_id(C.EOS)] *= 1.5
    return model


@pytest.mark.parametrize("strategy", ["discard_all", "reprefill", "none"])
def test_engine_rollouts_survive_malformed_output(tokenizer, strategy):
    chat = ChatTemplate(tokenizer, thinking=False)     # calls need no closed reasoning: more of them, all broken
    engine = Engine(_babbler(tokenizer), mode="sparse", max_batch=3, max_len=768, capture_routing=True, seed=3)
    policy = EnginePolicy(engine, chat, SamplingParams(temperature=1.0, max_new_tokens=40))
    episodes = [EchoEpisode(i) for i in range(8)]
    trajs = run_episodes(policy, episodes, RolloutConfig(max_turns=8, context=strategy, context_budget=0.7))
    assert all(ep.closed for ep in episodes) and not engine.busy
    assert all(t.finish_reason in ("answered", "turn_limit", "context", "length") for t in trajs)
    assert sum(t.turns for t in trajs) > 0 and sum(t.invalid_calls for t in trajs) > 0
    for t in trajs:
        assert len(t.windows) == t.context_resets + 1 and t.turns <= 8
    if strategy == "none":     # the window filled: those episodes end there
        assert any(t.finish_reason == "context" for t in trajs) and not any(t.context_resets for t in trajs)
    else:                      # ... or restart from the strategy's transcript
        assert any(t.context_resets for t in trajs) and any(t.finish_reason == "turn_limit" for t in trajs)
    for t in trajs:
        for w in t.windows:
            n = len(w.tokens)
            assert len(w.mask) == len(w.logprobs) == n and w.routing.shape[0] == n - 1
            assert all(lp <= 0 for lp, m in zip(w.logprobs, w.mask) if m)
            # between the policy's segments sit exactly the chat format's continuations (tool outputs, then the
            # next segment's prefix): the window grew by extension, earlier reasoning untouched
            runs, cur = [], [w.mask[0], []]
            for tok, m in zip(w.tokens, w.mask):
                if m != cur[0]:
                    runs.append(cur)
                    cur = [m, []]
                cur[1].append(tok)
            runs.append(cur)
            assert runs[0][0] == 0 and chat.decode(runs[0][1]).endswith(C.ASSISTANT + chat.segment_prefix)
            for m, toks in runs[1:]:
                text = chat.decode(toks)
                if m == 0:
                    assert text.startswith(C.OUTPUT_BEGIN) and text.endswith(C.OUTPUT_END + chat.segment_prefix)


class SlowEchoEpisode(EchoEpisode):
    """Tool calls that take a while, like a sandboxed tool's."""

    def step(self, call):
        import time
        time.sleep(0.05)
        return super().step(call)


class JitteryEchoEpisode(EchoEpisode):
    """Tool outputs that arrive after a random delay, so the engine's decode batches differ from run to run."""

    def step(self, call):
        import random
        import time
        time.sleep(random.uniform(0.0, 0.03))
        return super().step(call)


def test_rollouts_repeat_whatever_the_slots_order_and_tool_timing(tokenizer):
    """Each episode samples from its own key (EnginePolicy's per-episode seeds): identical episodes with the same
    seeds give the same windows, token for token, with 6 engine slots or 2 (slots reused, episodes queueing), in
    reversed order and with tool outputs arriving at random times; different seeds give different episodes."""
    model, chat = _babbler(tokenizer), ChatTemplate(tokenizer, thinking=False)
    sp = SamplingParams(temperature=1.0, max_new_tokens=40)
    seeds = [101, 102, 103, 104, 105, 106]

    def run(slots, seeds):
        engine = Engine(model, mode="sparse", max_batch=slots, max_len=768, seed=3)
        trajectories = run_episodes(EnginePolicy(engine, chat, sp, seeds), [JitteryEchoEpisode(i) for i in seeds],
                                    RolloutConfig(max_turns=3))
        return [[w.tokens for w in t.windows] for t in trajectories], sum(t.turns for t in trajectories)

    wide, turns = run(6, seeds)
    narrow, _ = run(2, seeds[::-1])
    assert turns > 0 and narrow[::-1] == wide
    assert len({str(w) for w in wide}) == len(seeds)


def test_more_episodes_than_engine_slots_with_slow_tools(tokenizer):
    """Every slot held by an episode awaiting its tool outputs while others wait for a slot: the rollout goes on
    (it used to spin in poll forever, the tool outputs never handed back)."""
    engine = Engine(_babbler(tokenizer), mode="sparse", max_batch=2, max_len=768, seed=3)
    policy = EnginePolicy(engine, ChatTemplate(tokenizer, thinking=False), SamplingParams(temperature=1.0,
                                                                                         max_new_tokens=40))
    episodes = [SlowEchoEpisode(i) for i in range(6)]
    done = []
    worker = threading.Thread(target=lambda: done.append(run_episodes(policy, episodes, RolloutConfig(max_turns=3))),
                              daemon=True)
    worker.start()
    worker.join(120)
    assert done, "run_episodes stalled with more episodes than engine slots"
    assert sum(t.turns for t in done[0]) > 0 and all(ep.closed for ep in episodes) and not engine.busy


class _Scripted(BaseHTTPRequestHandler):
    """A local server speaking the chat-completions protocol with a scripted policy."""
    script = "echo"
    seen: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = body["messages"]
        type(self).seen.append(msgs)
        n = sum(m["role"] == "assistant" for m in msgs)

        def call(args):
            return {"id": "x", "type": "function", "function": {"name": "echo", "arguments": args}}
        if type(self).script == "loop":                                   # always calls a tool
            msg = {"role": "assistant", "content": "", "tool_calls": [call(json.dumps({"text": "w" * 400}))]}
        elif n == 0:
            msg = {"role": "assistant", "content": "", "reasoning_content": "R0",
                   "tool_calls": [call(json.dumps({"text": "apple"}))]}
        elif n == 1:
            msg = {"role": "assistant", "content": "", "reasoning_content": "R1", "tool_calls": [call("{oops")]}
        else:
            msg = {"role": "assistant", "content": 'Done: {"answer": "apple"}', "reasoning_content": "R2"}
        total = sum(len(json.dumps(m)) for m in msgs) // 4
        self._send({"id": "c", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls" if "tool_calls" in msg
                                 else "stop", "logprobs": {"content": [{"token": "a", "logprob": -0.5}]}}],
                    "usage": {"prompt_tokens": total, "completion_tokens": 1, "total_tokens": total + 1}})


@pytest.fixture()
def server():
    _Scripted.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_backend_multi_turn(server):
    _Scripted.script = "echo"
    policy = OpenAIPolicy(server, SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=64))
    (traj,) = run_episodes(policy, [EchoEpisode(0)], RolloutConfig(max_turns=5))
    assert traj.passed and traj.finish_reason == "answered" and traj.turns == 2 and traj.invalid_calls == 1
    first, second, third = _Scripted.seen
    assert [m["role"] for m in first] == ["system", "user"] and first[0]["content"] == "Echo things."
    # the tool output answers the call by id, and within the turn the earlier reasoning is sent back
    assert second[2]["tool_calls"][0]["function"] == {"name": "echo", "arguments": json.dumps({"text": "apple"})}
    assert second[3] == {"role": "tool", "tool_call_id": second[2]["tool_calls"][0]["id"],
                         "content": json.dumps({"echo": "apple"})}
    assert second[2]["reasoning_content"] == "R0" and third[4]["reasoning_content"] == "R1"
    assert json.loads(third[5]["content"])["error"].startswith("invalid tool call")
    assert traj.windows[0].logprobs == [-0.5] * 3 and traj.windows[0].routing is None
    assert "routing" in policy.limits and "routing" not in policy.captures


def test_openai_backend_turn_limit_and_context_reset(server):
    _Scripted.script = "loop"
    policy = OpenAIPolicy(server, SamplingParams(max_new_tokens=16), max_context=1200)
    (traj,) = run_episodes(policy, [EchoEpisode(0)], RolloutConfig(max_turns=7, context="discard_all",
                                                                   context_budget=0.8))
    assert traj.finish_reason == "turn_limit" and traj.turns == 7
    assert traj.context_resets >= 1 and len(traj.windows) == traj.context_resets + 1
    lengths = [len(m) for m in _Scripted.seen]
    assert lengths[0] == 2 and 2 in lengths[1:] and max(lengths) > 4    # a later window restarted from the task
    assert len(traj.full_messages) > len(traj.messages)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(LLMError, match="127.0.0.1:9"):
        OpenAIPolicy("http://127.0.0.1:9/v1", SamplingParams(), timeout_s=2)


def test_a_failing_tool_is_an_observation_not_a_crash(server):
    class Broken(EchoEpisode):
        def step(self, call):
            raise OSError("sandbox vanished")

    _Scripted.script = "echo"
    (traj,) = run_episodes(OpenAIPolicy(server, SamplingParams()), [Broken(0)], RolloutConfig(max_turns=5))
    assert traj.finish_reason == "answered" and not traj.passed
    assert "the tool failed: OSError: sandbox vanished" in traj.messages[3]["content"]
