"""The OpenAI-compatible backend: any server speaking /v1/chat/completions with tools (vLLM and SGLang serve
DeepSeek-V3.2 this way) behind the rollout Policy interface.

Limits, by construction of the protocol: the server applies its own chat template and parses tool calls itself;
no MoE routing and no kept-token sets come back (Keep Routing and Keep Sampling Mask need the in-process engine);
per-token log-probs only when the server honours `logprobs: true` (they are recorded, without token ids). A
request that fails (server gone, bad reply) ends that episode with finish_reason "error".
"""
from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Optional

from dsaforge.data.chat import AssistantTurn, ToolCall
from dsaforge.model.sampling import SamplingParams
from dsaforge.rollout.policy import Turn, Window
from dsaforge.synth.llm import LLMError, OpenAIClient

LIMITS = ("OpenAI-compatible backend: no MoE routing and no kept-token sets (Keep Routing / Keep Sampling Mask need "
          "the in-process engine); log-probs only if the server returns them")


def _to_openai(messages: list[dict], key: int) -> list[dict]:
    """Our message dicts -> the protocol's: tool calls get ids, tool outputs point at them in order."""
    out, ids = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            msg = {"role": "assistant", "content": m.get("content") or ""}
            if m.get("reasoning_content"):
                msg["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls") or []
            ids = [f"call_{key}_{i}_{j}" for j in range(len(calls))]
            if calls:
                msg["tool_calls"] = [{"id": cid, "type": "function",
                                      "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                                     for cid, c in zip(ids, calls)]
            out.append(msg)
        elif m["role"] == "tool":
            cid = ids.pop(0) if ids else f"call_{key}_{i}_orphan"
            out.append({"role": "tool", "tool_call_id": cid, "content": m.get("content") or ""})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def _from_openai(choice: dict) -> tuple[Turn, list[float]]:
    msg = choice.get("message") or {}
    calls = []
    for c in msg.get("tool_calls") or []:
        f = c.get("function") or {}
        name, raw = str(f.get("name") or ""), f.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) else (raw or {})
            calls.append(ToolCall(name, args) if isinstance(args, dict) and name else
                         ToolCall(name, {}, "arguments must be a JSON object" if name else "empty tool name"))
        except json.JSONDecodeError as e:
            calls.append(ToolCall(name, {}, f"arguments are not valid JSON ({e.msg})"))
    reasoning = msg.get("reasoning_content", msg.get("reasoning"))
    finish = choice.get("finish_reason") or "stop"
    turn = AssistantTurn(content=msg.get("content") or "", reasoning=reasoning, tool_calls=calls,
                         finished=finish != "length")
    lps = [t.get("logprob", 0.0) for t in ((choice.get("logprobs") or {}).get("content") or [])]
    return Turn(turn, "length" if finish == "length" else "stop", len(lps)), lps


class OpenAIPolicy:
    def __init__(self, base_url: str, params: SamplingParams, model: Optional[str] = None,
                 max_context: int = 131072, workers: int = 16, api_key: Optional[str] = None,
                 timeout_s: float = 600.0, logprobs: bool = True):
        self.client = OpenAIClient(base_url, model=model, api_key=api_key, timeout_s=timeout_s)
        self.params, self.max_context, self.want_logprobs = params, max_context, logprobs
        self.captures = frozenset({"logprobs"} if logprobs else set())
        self.limits = LIMITS
        self._pool = ThreadPoolExecutor(workers)
        self._msgs: dict[int, list[dict]] = {}
        self._tools: dict[int, list[dict]] = {}
        self._used: dict[int, int] = {}
        self._win: dict[int, Window] = {}
        self._running: dict[Future, int] = {}

    def _body(self, key: int) -> dict:
        p = self.params
        body = {"messages": _to_openai(self._msgs[key], key), "max_tokens": p.max_new_tokens,
                "temperature": p.temperature}
        if p.top_p < 1:
            body["top_p"] = p.top_p
        if p.top_k > 0:
            body["top_k"] = p.top_k            # vLLM / SGLang extension
        if self._tools[key]:
            body["tools"] = self._tools[key]
        if self.want_logprobs:
            body["logprobs"] = True
        return body

    def _launch(self, key: int) -> None:
        self._running[self._pool.submit(self.client.chat_completion, self._body(key))] = key

    def begin(self, key, messages, tools):
        self._msgs[key], self._tools[key], self._used[key] = list(messages), list(tools), 0
        self._win[key] = Window()
        self._launch(key)

    def extend(self, key, tool_messages):
        self._msgs[key] += tool_messages
        self._launch(key)

    def prompt_tokens(self, messages, tools):
        # ~4 characters per token: the server's tokenizer is not here
        return (sum(len(json.dumps(m)) for m in messages) + len(json.dumps(tools))) // 4

    def context_used(self, key, tool_messages):
        # The server's token count of the last exchange, plus the new outputs at ~4 characters per token.
        return self._used[key] + sum(len(m.get("content") or "") for m in tool_messages) // 4

    def poll(self):
        if not self._running:
            return []
        done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            key = self._running.pop(f)
            try:
                resp = f.result()
                choices = resp.get("choices") or []
                if not choices:
                    raise LLMError("the server returned no choices")
                turn, lps = _from_openai(choices[0])
                usage = resp.get("usage") or {}
                self._used[key] = int(usage.get("total_tokens") or self._used[key])
                self._win[key].logprobs += lps
                self._win[key].mask += [1] * len(lps)
            except (LLMError, KeyError, TypeError, ValueError) as e:
                turn = Turn(AssistantTurn(content="", error=str(e)[:300]), "error")
            self._msgs[key].append(turn.parsed.message())
            out.append((key, turn))
        return out

    def end(self, key):
        self._msgs.pop(key, None)
        self._tools.pop(key, None)
        return self._win.pop(key, Window())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
