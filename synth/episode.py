"""One episode interface over the four agent classes: what a rollout (RL, evaluation, the console) talks to.

    ep = make_episode(task, cfg.synth.sandbox)
    messages = ep.reset()                      # system + user messages; ep.tools are the function schemas
    obs = ep.step({"name": "search", "arguments": {"query": "..."}})    # the tool's real output, as text
    verdict = ep.submit(ep.submission_from_text(final_content))        # scored by the task's own verifier
    ep.close()
    verdicts = submit_many(episodes, submissions)   # the same verdicts, one verifier run per environment
    observations = step_many(episodes, calls)       # the same outputs, one tool run per environment and round

Per-episode state: the general agent's calls so far (replayed on a fresh database for every call and for scoring,
so the tools and the verifier cannot disagree), the code agent's working copy of the file, the interpreter's one
live Jupyter kernel (started by `reset`, kept until `close`). Every tool runs inside the sandbox. A call that cannot
run (unknown tool, arguments not an object, a parse error from the chat format) returns an "invalid call"
observation; `step` never raises for anything the model wrote.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from dsaforge.config import SandboxConfig
from dsaforge.data.chat import ToolCall, invalid_call_observation
from dsaforge.synth.base import HarnessError, run_harness
from dsaforge.synth.registry import agent_class
from dsaforge.synth.sandbox import Sandbox, SandboxProcess
from dsaforge.synth.task import Task, Verdict, evaluate_tasks

SYSTEM = {
    "general": "You operate tools over a database to complete the user's task. Call tools as needed; when done, "
               "reply with the final answer as a JSON object {\"answer\": ...} and no tool call.",
    "search": "You answer questions by searching a local document corpus. Call tools as needed; when done, reply "
              "with {\"answer\": \"...\"} and no tool call.",
    "code": "You repair a bug in a repository. Read the file, apply patches and run the visible tests with the "
            "tools; when done, reply with {\"patch\": \"<unified diff>\"} or {\"done\": true} to submit the file "
            "as it stands.",
    "code_interpreter": "You solve problems by running Python in a Jupyter kernel (state persists between calls). "
                        "When done, reply with {\"answer\": <number>} and no tool call.",
}


def _obs(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)


def _json_object(text: str) -> Optional[dict]:
    """The last JSON object in a reply (bare, or in a ```json fence)."""
    if not isinstance(text, str):
        return None
    for m in reversed(list(re.finditer(r"```(?:json)?\s*\n(.*?)```", text, re.S))):
        try:
            v = json.loads(m.group(1))
            if isinstance(v, dict):
                return v
        except json.JSONDecodeError:
            pass
    dec, found, i = json.JSONDecoder(), None, text.find("{")
    while i >= 0:
        try:
            v, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        found, i = v, text.find("{", end)         # the last top-level object, not one nested inside it
    return found


class Episode:
    """Base episode; subclasses implement `_call` (and `_start`/`close` when they hold live state)."""

    def __init__(self, task: Task, sandbox: Optional[Sandbox | SandboxConfig] = None):
        if task.root is None:
            raise ValueError(f"task {task.task_id} is not attached to a manifest directory (load it with load_tasks)")
        self.task = task
        self.cls = agent_class(task.agent_class)
        if sandbox is None or isinstance(sandbox, SandboxConfig):
            # The synthesis output (answers, gold patches) is hidden from everything that runs in the sandbox.
            sandbox = Sandbox(sandbox or SandboxConfig(), hide=[str(Path(task.root).resolve())])
        self.sandbox = sandbox
        self.tools: list[dict] = list(task.tools)
        self.calls: list[dict] = []         # calls that ran, in order
        self.started = False

    @property
    def tool_names(self) -> list[str]:
        return [t.get("function", t)["name"] for t in self.tools]

    def reset(self) -> list[dict]:
        self.close()
        self.calls, self.started = [], True
        self._start()
        return [{"role": "system", "content": SYSTEM[self.task.agent_class]},
                {"role": "user", "content": self.task.prompt}]

    def _start(self) -> None:
        pass

    def step(self, call: ToolCall | dict) -> str:
        """Run one tool call and return its observation (text). Invalid calls get an "invalid call" observation."""
        checked = self._checked(call)
        if isinstance(checked, str):
            return checked
        try:
            out = self._call(checked)
        except HarnessError as e:
            out = {"error": f"the tool failed: {str(e)[:300]}"}
        self.calls.append(checked)
        return _obs(out)

    def _checked(self, call: ToolCall | dict) -> dict | str:
        """The call as {"name", "arguments"}, or the invalid-call observation the model gets instead."""
        if not self.started:
            raise RuntimeError("call reset() before step()")
        if isinstance(call, ToolCall):
            if call.error:
                return invalid_call_observation(call.error)
            call = call.as_message_call()
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return invalid_call_observation("a call needs a tool name")
        name, args = call["name"], call.get("arguments") if call.get("arguments") is not None else {}
        if name not in self.tool_names:
            return invalid_call_observation(f"unknown tool {name!r}; available: {', '.join(self.tool_names)}")
        if not isinstance(args, dict):
            return invalid_call_observation("arguments must be a JSON object")
        return {"name": name, "arguments": args}

    @property
    def tool_group(self) -> Optional[tuple]:
        """Episodes with equal groups have their calls served together (`step_many`); None: each alone."""
        return None

    def _call(self, call: dict) -> Any:
        raise NotImplementedError

    def submission_from_text(self, text: str) -> Any:
        """The submission a final reply stands for: its last JSON object (None when there is none)."""
        return _json_object(text)

    def payload(self, submission: Any) -> Any:
        """What the task's verifier scores for this final submission (subclasses add the episode's own record)."""
        return submission

    def submit(self, submission: Any) -> Verdict:
        """Score with the task's own verifier (Task.evaluate: the same code path RL's reward and eval use)."""
        return submit_many([self], [submission])[0]

    @property
    def scoring_group(self) -> tuple:
        """Finished episodes with equal groups are verified in one sandboxed run (`submit_many`)."""
        return self.task.agent_class, str(self.task.env_dir), repr(self.sandbox)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Episode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GeneralEpisode(Episode):
    def _call(self, call):
        return self.cls.call_tool(self.task.env_dir, self.task.key, self.calls, call, self.sandbox)

    @property
    def tool_group(self):
        return self.scoring_group      # stateless calls (a replay per call): one environment's run serves them all

    def payload(self, submission):
        """The answer with the calls this episode made: the verifier replays them to check the final state."""
        answer = submission.get("answer") if isinstance(submission, dict) else None
        return {"answer": answer, "calls": list(self.calls)}


class SearchEpisode(Episode):
    """The BM25 index is built once per episode, in a live sandboxed process, instead of once per call."""

    def __init__(self, task, sandbox=None):
        super().__init__(task, sandbox)
        self.server: Optional[SandboxProcess] = None

    def _start(self):
        from dsaforge.synth.search import HARNESS

        files = {"harness.py": HARNESS.read_text(), "facts.jsonl": (self.task.env_dir / "facts.jsonl").read_bytes(),
                 "corpus.jsonl": self.cls._corpus_file(self.task.env_dir).read_bytes()}
        self.server = self.sandbox.spawn(self.sandbox.stdlib_python("/tmp/harness.py", "serve"), files=files)
        ready = self.server.request(None, wall_seconds=self.sandbox.cfg.wall_seconds * 2)
        if not ready.get("ready"):
            self.close()
            raise HarnessError(f"the search tools did not start in the sandbox: {ready.get('error', ready)}")

    def _call(self, call):
        if self.server is None or not self.server.alive:
            return {"error": "the search tools are not running (stopped after a limit)"}
        reply = self.server.request({"call": call}, wall_seconds=self.sandbox.cfg.wall_seconds)
        return reply.get("result", reply)            # a stopped process replies {"error": ...}

    def close(self):
        if self.server is not None:
            self.server.close()
            self.server = None


class CodeEpisode(Episode):
    """read_file / apply_patch / run_visible_tests on a working copy; submitting with no patch submits the working
    copy's diff against the original file."""

    def __init__(self, task, sandbox=None):
        super().__init__(task, sandbox)
        from dsaforge.synth.code import CODE_TOOLS, agent_sandbox

        self.tools = list(task.tools) or list(CODE_TOOLS)
        meta = json.loads((task.env_dir / "hidden" / "tasks.json").read_text())[task.key]
        self.module, self.examples = meta["module"], meta["examples"]
        self.original = (task.env_dir / task.key / "repo" / f"{self.module}.py").read_text()
        self.source = self.original
        self.agent_box = agent_sandbox(self.module, self.sandbox)   # the pristine module is hidden from the tools

    def _start(self):
        self.source = self.original

    def _call(self, call):
        from dsaforge.synth.code import HARNESS

        res = self.agent_box.run([self.agent_box.python, "-I", "/tmp/harness.py"],
                                 files={"harness.py": HARNESS.read_text()},
                                 stdin=json.dumps({"op": "tool", "module": self.module, "source": self.source,
                                                   "tool": call["name"], "arguments": call["arguments"],
                                                   "examples": self.examples}))
        lines = res.stdout.strip().splitlines()
        if not res.ok or not lines:
            return {"error": f"the tool did not finish: {res.describe()}"}
        out = json.loads(lines[-1])
        self.source = out["source"]
        return out["output"]

    def working_patch(self) -> str:
        from dsaforge.synth.code.harness import unified_diff

        return unified_diff(self.original, self.source, f"{self.module}.py")

    def payload(self, submission):
        if not (isinstance(submission, dict) and isinstance(submission.get("patch"), str) and submission["patch"]):
            submission = {"patch": self.working_patch()}
        return submission


class InterpreterEpisode(Episode):
    """One live Jupyter kernel per episode, in the sandbox, in a directory holding the task's data files."""

    def __init__(self, task, sandbox=None):
        super().__init__(task, sandbox)
        self.kernel: Optional[SandboxProcess] = None

    def _start(self):
        from dsaforge.synth.interpreter import HARNESS

        files = {"harness.py": HARNESS.read_text()}
        data = self.task.env_dir / self.task.key / "data"
        if data.is_dir():
            files.update({f"work/{p.name}": p.read_bytes() for p in sorted(data.iterdir())})
        timeout = self.sandbox.cfg.wall_seconds
        self.kernel = self.sandbox.spawn([self.sandbox.python, "-I", "/tmp/harness.py", "serve", "/tmp/work",
                                          str(timeout)], files=files)
        ready = self.kernel.request(None, wall_seconds=90)             # the server greets once its kernel runs
        if not ready.get("ready"):
            self.close()
            raise HarnessError(f"the Jupyter kernel did not start in the sandbox: {ready.get('error', ready)}")

    def _call(self, call):
        if self.kernel is None or not self.kernel.alive:
            return {"error": "the kernel is not running (it was stopped after a limit); its state is lost"}
        return self.kernel.request({"code": str(call["arguments"].get("code", ""))},
                                   wall_seconds=self.sandbox.cfg.wall_seconds + 10)

    def close(self):
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None


_EPISODES = {"general": GeneralEpisode, "search": SearchEpisode, "code": CodeEpisode,
             "code_interpreter": InterpreterEpisode}


def submit_many(episodes: Sequence[Episode], submissions: Sequence[Any]) -> list[Verdict]:
    """The verdicts `Episode.submit` gives each episode's submission, with the episodes of one scoring group (agent
    class, environment, sandbox) verified together (`dsaforge.synth.task.evaluate_tasks`)."""
    groups: dict[tuple, list[int]] = {}
    for i, ep in enumerate(episodes):
        groups.setdefault(ep.scoring_group, []).append(i)
    out: list[Optional[Verdict]] = [None] * len(episodes)
    for idx in groups.values():
        verdicts = evaluate_tasks([episodes[i].task for i in idx],
                                  [episodes[i].payload(submissions[i]) for i in idx], episodes[idx[0]].sandbox)
        for i, v in zip(idx, verdicts):
            out[i] = v
    return out   # type: ignore[return-value]


def step_many(episodes: Sequence[Episode], calls: Sequence[Sequence[ToolCall | dict]]) -> list[list[str]]:
    """The observations `Episode.step` gives each episode's calls (calls[i]: episode i's calls of one segment, run
    in order), with the calls of episodes in one tool group (a general environment) served by one sandboxed run per
    round (round r: every episode's r-th call). Each call is replayed on its own fresh database, so the outputs are
    those of calling alone; a shared run that fails as a whole (a call that makes the harness time out or crash) is
    redone one call at a time."""
    obs: list[list[str]] = [[] for _ in episodes]
    for r in range(max((len(c) for c in calls), default=0)):
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for i, (ep, cs) in enumerate(zip(episodes, calls)):
            if r < len(cs):
                checked = ep._checked(cs[r])
                if isinstance(checked, str):
                    obs[i].append(checked)
                else:
                    groups.setdefault(ep.tool_group or ("alone", i), []).append((i, checked))
        for members in groups.values():
            if len(members) == 1:
                i, call = members[0]
                obs[i].append(episodes[i].step(call))
                continue
            first = episodes[members[0][0]]
            items = [(episodes[i].task.key, list(episodes[i].calls), call) for i, call in members]
            try:
                outs = first.cls.call_tools(first.task.env_dir, items, first.sandbox)
            except HarnessError:
                for i, call in members:
                    obs[i].append(episodes[i].step(call))
                continue
            for (i, call), out in zip(members, outs):
                episodes[i].calls.append(call)
                obs[i].append(_obs(out))
    return obs


def make_episode(task: Task, sandbox: Optional[Sandbox | SandboxConfig] = None) -> Episode:
    """The episode for a task of any agent class; `sandbox` is a Sandbox or cfg.synth.sandbox."""
    if task.agent_class not in _EPISODES:
        raise ValueError(f"unknown agent class {task.agent_class!r}")
    return _EPISODES[task.agent_class](task, sandbox)
