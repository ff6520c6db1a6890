"""LLM-driven synthesis over an OpenAI-compatible HTTP API (vLLM, SGLang, llama.cpp server, ...).

- `FamilyWriter` asks the model to write a general-agent family module (database, tools, task proposals, a
  tool-only solution and a verifier) for a task category. The module is untrusted: it is checked statically,
  then built, solved and verified only inside the sandbox, behind the same gates as the procedural families.
- `ChatSolver` is a solver for the pass@k filter that drives a policy model through the tasks' tools (the
  policy being trained, once RL exists), so the filter keeps tasks the policy can sometimes solve.

Set `synth.llm_endpoint` to the server's base URL (e.g. http://127.0.0.1:8000/v1).
"""
from __future__ import annotations

import ast
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from dsaforge.synth.base import AgentClass, EnvDraft
from dsaforge.synth.sandbox import Sandbox

ALLOWED_IMPORTS = {"json", "random", "math", "itertools", "functools", "re", "datetime", "collections", "string"}
REQUIRED = ("build_db", "SCHEMAS", "TOOL_LEVEL", "make_tools", "propose", "leaks", "solve", "verify")
CATEGORIES = ("warehouse inventory restocking", "clinic appointment scheduling", "library loans and holds",
              "household budget ledger", "train seat reservations", "course timetable planning")


class LLMError(RuntimeError):
    pass


class OpenAIClient:
    """Minimal chat-completions client (standard library HTTP, no SDK dependency)."""

    def __init__(self, base_url: str, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout_s: float = 120.0) -> None:
        self.base_url, self.api_key, self.timeout_s = base_url.rstrip("/"), api_key, timeout_s
        self.model = model or self._first_model()

    def _request(self, path: str, body: Optional[dict] = None) -> dict:
        req = urllib.request.Request(self.base_url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})},
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise LLMError(f"{self.base_url}{path}: {e}") from e

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise LLMError(f"{self.base_url}/models lists no model")
        return models[0]["id"]

    def chat_completion(self, body: dict) -> dict:
        """POST /chat/completions with `body` (the model filled in) and return the whole response."""
        return self._request("/chat/completions", {"model": self.model, **body})

    def chat(self, messages: list[dict], tools: Optional[list[dict]] = None, temperature: float = 1.0,
             max_tokens: int = 4096) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if tools:
            body["tools"] = tools
        choices = self._request("/chat/completions", body).get("choices") or []
        if not choices:
            raise LLMError("the endpoint returned no choices")
        return choices[0]["message"]


# ---- environment synthesis -----------------------------------------------------------------------------------
FAMILY_PROMPT = """You are an environment-synthesis agent. Write one Python module (standard library only; allowed
imports: {imports}) that defines a task family for the category: {category}.

It must define, exactly as in this contract:
- build_db(conn, rng): create tables in the sqlite3 connection and fill them with varied data using rng (random.Random).
- SCHEMAS: dict tool name -> {{"description": str, "parameters": JSON schema}}; TOOL_LEVEL: dict tool name -> the
  difficulty level (1..5) from which the tool is available. Level 1 tools must suffice for level 1 tasks.
- make_tools(conn): dict tool name -> function(**arguments) reading or changing the database.
- propose(conn, rng, difficulty): (params, hidden, prompt) or None. Tasks must be hard to solve and easy to verify;
  raise the difficulty with more constraints. params are public; hidden is only for the verifier; the prompt must
  never contain the answer or anything from hidden.
- leaks(hidden): list of strings that must not appear in the prompt.
- solve(tools, params, rng): the reference solution. It may ONLY call tools as tools.<name>(**kwargs) and compute;
  no imports, no open/eval/getattr, no database access, no module-level names except other functions named _sol_*.
  With rng=None it must be correct; with an rng it may make occasional mistakes (a baseline solver).
- verify(conn, params, hidden, answer): (ok: bool, detail: str), checking the answer and the final database state.
Reply with the module in one ```python block."""


def extract_code(text: str) -> str:
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    return (m.group(1) if m else text).strip() + "\n"


def static_problems(source: str) -> list[str]:
    """Reject a model-written family before anything runs: syntax, imports, missing parts of the contract."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"syntax error: {e}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"import of {n}" for n in names if n.split(".")[0] not in ALLOWED_IMPORTS]
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    problems += [f"missing {r}" for r in REQUIRED if r not in defined]
    return problems


class FamilyWriter:
    def __init__(self, client: OpenAIClient, attempts: int = 3) -> None:
        self.client, self.attempts = client, attempts

    def write(self, category: str, dest: Path) -> Optional[Path]:
        """Ask for a family module, feeding static problems back to the model; None after `attempts` tries."""
        messages = [{"role": "user", "content": FAMILY_PROMPT.format(category=category, imports=", ".join(sorted(ALLOWED_IMPORTS)))}]
        for _ in range(self.attempts):
            reply = self.client.chat(messages, temperature=0.7)
            source = extract_code(reply.get("content") or "")
            problems = static_problems(source)
            if not problems:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(source)
                return dest
            messages += [reply, {"role": "user", "content": "Fix these problems and reply with the whole module: "
                                 + "; ".join(problems)}]
        return None


def write_families(endpoint: str, out_dir: Path, count: int, model: Optional[str] = None) -> dict[str, str]:
    """-> {"llm:<slug>": module path} for the categories the model wrote a statically valid module for."""
    writer = FamilyWriter(OpenAIClient(endpoint, model))
    out = {}
    for category in CATEGORIES[:count]:
        slug = re.sub(r"\W+", "_", category).strip("_")
        path = writer.write(category, out_dir / "llm_families" / f"{slug}.py")
        if path is not None:
            out[f"llm:{slug}"] = str(path)
    return out


# ---- policy solver for the pass@k filter ---------------------------------------------------------------------
class ChatSolver:
    """Solves tasks with a chat model: a tool-calling loop for general and search tasks, one reply (a patch or a
    number) for code and code-interpreter tasks. Submissions follow the Task contract."""

    def __init__(self, endpoint: str, model: Optional[str] = None, max_turns: int = 12) -> None:
        self.endpoint, self.model, self.max_turns = endpoint, model, max_turns
        self.name = f"chat:{model or 'endpoint-default'}"
        self._client: Optional[OpenAIClient] = None

    @property
    def client(self) -> OpenAIClient:
        if self._client is None:          # created lazily, in the worker process that uses it
            self._client = OpenAIClient(self.endpoint, self.model)
        return self._client

    def attempts(self, cls: AgentClass, draft: EnvDraft, keys: list[str], k: int, seed: int,
                 sandbox: Sandbox) -> list[list[Any]]:
        by_key = {c.key: c for c in draft.candidates}
        return [[self._episode(cls, draft, by_key[key], sandbox) for _ in range(k)] for key in keys]

    def _episode(self, cls, draft, cand, sandbox) -> dict:
        messages = [{"role": "user", "content": cand.prompt + "\nReply with the final JSON object only."}]
        calls: list[dict] = []
        tools = cand.tools if cls.name in ("general", "search") else None
        try:
            for _ in range(self.max_turns):
                msg = self.client.chat(messages, tools=tools)
                messages.append(msg)
                if not msg.get("tool_calls"):
                    final = _json_object(msg.get("content") or "")
                    return dict(final, calls=calls) if cls.name == "general" else final
                for tc in msg["tool_calls"]:
                    call = {"name": tc["function"]["name"], "arguments": _json_object(tc["function"].get("arguments") or "{}")}
                    if cls.name == "general":
                        result = cls.call_tool(draft.dir, cand.key, calls, call, sandbox)
                    else:
                        result = cls.call_tool(draft.dir, call, sandbox)
                    calls.append(call)
                    messages.append({"role": "tool", "tool_call_id": tc.get("id", ""), "content": json.dumps(result)[:8000]})
        except LLMError:
            pass
        return {"answer": None, "calls": calls} if cls.name == "general" else {"answer": None, "patch": ""}


def _json_object(text: str) -> dict:
    m = re.search(r"\{.*\}", text, re.S)
    try:
        obj = json.loads(m.group(0)) if m else {}
    except json.JSONDecodeError:
        obj = {}
    return obj if isinstance(obj, dict) else {}
