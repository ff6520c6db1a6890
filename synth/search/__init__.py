"""Search agent: a local BM25 search tool over an offline corpus, and multi-hop questions over linked facts
about long-tail entities planted in that corpus. A question is kept only when its ground truth checks out hop
by hop (retrievable, unambiguous) and its distractor answers - confusable entities' facts - are verifiably wrong."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from dsaforge.synth.base import AgentClass, Candidate, EnvDraft, HarnessError, run_harness
from dsaforge.synth.task import Verdict

HARNESS = Path(__file__).with_name("harness.py")
SYL = ["var", "nok", "quil", "ane", "tes", "quin", "mor", "dal", "bre", "vo", "sha", "ren", "ul", "ix", "pa", "lor",
       "zen", "ka", "thu", "mir", "esk", "ob", "fyr", "ald"]
FAMILIES = ("landmarks", "institutes")
KINDS = {"landmarks": ("Bridge", "Tower", "Gate", "Arcade"), "institutes": ("Observatory", "Library", "Conservatory", "Archive")}
CHAINS = {1: ["built_by", "founded_year"], 2: ["built_by", "founded_by", "born_in"],
          3: ["built_by", "founded_by", "born_in", "twin_of"]}
SENT = {"built_by": "{s} was built by {o}.", "founded_by": "{s} was founded by {o}.", "born_in": "{s} was born in {o}.",
        "twin_of": "{s} is twinned with {o}.", "founded_year": "{s} was established in {o}."}
SEARCH_TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "BM25 search over the local corpus.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                                                     "required": ["query"]}}},
    {"type": "function", "function": {"name": "open_document", "description": "Full text of a document by id.",
                                      "parameters": {"type": "object", "properties": {"doc_id": {"type": "string"}}, "required": ["doc_id"]}}},
]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


def _question(chain: list[str], start: str) -> str:
    phrase = start
    for rel in chain:
        if rel == "founded_year":
            return f"In which year was {phrase} established?"
        phrase = {"built_by": "the company that built {}", "founded_by": "the founder of {}",
                  "born_in": "the city where {} was born", "twin_of": "the twin town of {}"}[rel].format(phrase)
    return f"What is {phrase}?"


class SearchAgent(AgentClass):
    name = "search"
    families = FAMILIES

    def _world(self, rng: random.Random, family: str, n_siblings: int):
        """One chain of linked entities plus confusable siblings (same name stem, other facts)."""
        stem = _name(rng, 3)
        used: set[str] = set()

        def fresh(make):
            while True:
                v = make()
                if v not in used:
                    used.add(v)
                    return v

        chains = []
        for kind in rng.sample(KINDS[family], 1 + n_siblings):
            landmark = f"{stem} {kind}"
            company = fresh(lambda: f"{_name(rng)} {rng.choice(['Works', 'Holdings', 'Guild', 'Company'])}")
            person = fresh(lambda: f"{_name(rng)} {_name(rng)}")
            city, twin = fresh(lambda: _name(rng, 3)), fresh(lambda: _name(rng, 3))
            year = fresh(lambda: str(rng.randint(1700, 2015)))
            chains.append({"built_by": (landmark, company), "founded_by": (company, person),
                           "born_in": (person, city), "twin_of": (city, twin), "founded_year": (company, year)})
        return chains

    def build_env(self, env_id, family, seed, max_difficulty, env_dir, resources):
        rng = random.Random(seed)
        corpus = [json.loads(l) for l in Path(resources["corpus"]).read_text().splitlines()]
        env_dir.mkdir(parents=True, exist_ok=True)
        facts, tasks, cands = [], {}, []
        for level in range(1, max_difficulty + 1):
            for j in range(resources.get("tasks_per_level", 1)):
                key = f"d{level}-{j}"
                chain = CHAINS[min(level, 3)]
                worlds = self._world(rng, family, min(level, 3))   # more confusable siblings as difficulty rises
                true = worlds[0]
                for w in worlds:
                    for rel, (s, o) in w.items():
                        host = rng.choice(corpus)   # each statement is planted into a real document
                        facts.append({"id": f"{env_id}/{key}/{len(facts)}", "title": f"{s} ({host['title']})",
                                      "text": SENT[rel].format(s=s, o=o) + "\n" + host["text"][:800]})
                start = true["built_by"][0]
                hops, cur = [], start
                for rel in chain:
                    cur = true[rel][1]
                    hops.append(cur)
                last = chain[-1]
                distractors = sorted({w[last][1] for w in worlds[1:]} | {true[r][1] for r in ("born_in", "twin_of")
                                                                          if r != last and last != "founded_year"})
                if last == "founded_year":      # near-miss years: the classic wrong answer to a date question
                    distractors += [str(int(hops[-1]) + 1), str(int(hops[-1]) - 10)]
                distractors = sorted({d for d in distractors if d != hops[-1]})
                tasks[key] = {"start": start, "chain": chain, "hops": hops, "answer": hops[-1],
                              "distractors": distractors}
                prompt = (_question(chain, start) + " Use the search tools over the local corpus; answer "
                          '{"answer": "<name or year>"}.')
                cands.append(Candidate(key, family, level, prompt, SEARCH_TOOLS, leaks=hops, seed=seed))
        with open(env_dir / "facts.jsonl", "w") as f:
            for d in facts:
                f.write(json.dumps(d) + "\n")
        digest = hashlib.sha256(json.dumps(corpus + facts, sort_keys=True).encode()).hexdigest()
        for t in tasks.values():
            t["corpus_sha256"] = digest
        (env_dir / "tasks.json").write_text(json.dumps(tasks, sort_keys=True))
        (env_dir / "corpus.ref").write_text(str(Path(resources["corpus"]).resolve().name))
        self._corpus = Path(resources["corpus"])
        draft = EnvDraft(env_id, self.name, family, env_dir, "tasks.json", cands)
        # The paper's filter for search QA, recorded as extra gates on each task.
        sandbox = resources["sandbox"]
        checks = self._run(env_dir, {"op": "check", "items": [{"key": c.key} for c in cands]}, sandbox)
        for c, r in zip(cands, checks):
            c.extra_gates = {"ground_truth_checked": bool(r.get("ground_truth_ok")),
                             "distractors_wrong": bool(r.get("distractors_wrong"))}
        return draft

    def _corpus_file(self, env_dir: Path) -> Path:
        # Bundles are laid out as <out>/envs/<env_id>; the shared corpus sits at <out>/search/<name>.
        return env_dir.parent.parent / "search" / (env_dir / "corpus.ref").read_text().strip()

    def _run(self, env_dir, job, sandbox):
        extra = {"corpus.jsonl": self._corpus_file(env_dir).read_bytes()}
        return run_harness(sandbox, HARNESS, env_dir, job, include=["tasks.json", "facts.jsonl"], extra=extra,
                           wall_seconds=sandbox.cfg.wall_seconds * 2)

    def reference(self, env_dir, keys, sandbox):
        out = self._run(env_dir, {"op": "solve", "items": [{"key": k} for k in keys]}, sandbox)
        return [{"answer": o["answer"]} if o.get("answer") else None for o in out]

    def verify(self, env_dir, keys, submissions, sandbox):
        items = [{"key": k, "submission": s} for k, s in zip(keys, submissions)]
        try:
            out = run_harness(sandbox, HARNESS, env_dir, {"op": "verify", "items": items}, include=["tasks.json"])
        except HarnessError as e:
            return [Verdict(False, 0.0, str(e)[:500], harness_failed=True) for _ in keys]
        return [Verdict.from_dict(o) for o in out]

    def reset_ok(self, env_dir, keys, sandbox):
        return all(o.get("reset_ok") for o in self._run(env_dir, {"op": "reset", "items": [{"key": keys[0]}]}, sandbox))

    def attempts(self, env_dir, keys, k, seed, sandbox):
        items = [{"key": key, "seed": seed * 1000 + i} for key in keys for i in range(k)]
        out = self._run(env_dir, {"op": "solve", "items": items}, sandbox)
        subs = [{"answer": o.get("answer")} for o in out]
        return [subs[i * k:(i + 1) * k] for i in range(len(keys))]

    def call_tool(self, env_dir: Path, call: dict, sandbox) -> object:
        """Serve one search / open_document call of a rollout."""
        return self._run(env_dir, {"op": "call", "items": [{"call": call}]}, sandbox)[0]["result"]
