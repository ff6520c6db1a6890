"""LLM-driven mode against a fake OpenAI-compatible server on 127.0.0.1: a model-written family goes through the
sandboxed build and the same gates; the chat solver drives tools through the tasks' own sandboxed servers."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsaforge.config import presets
from dsaforge.synth.gates import validate_env
from dsaforge.synth.generate import synthesize
from dsaforge.synth.llm import ChatSolver, OpenAIClient, extract_code, static_problems
from dsaforge.synth.search import SearchAgent
from dsaforge.synth.search.corpus import build_corpus
from dsaforge.synth.task import load_tasks

from .conftest import requires_bwrap

INVENTORY = '''
import json

SCHEMAS = {
    "list_items": {"description": "Items with stock and reorder level.", "parameters": {"type": "object", "properties": {}}},
    "get_price": {"description": "Unit price of an item.", "parameters": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}},
    "order": {"description": "Order units of an item.", "parameters": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku", "qty"]}},
}
TOOL_LEVEL = {"list_items": 1, "get_price": 1, "order": 1}


def build_db(conn, rng):
    conn.execute("CREATE TABLE item(sku TEXT PRIMARY KEY, stock INTEGER, reorder INTEGER, price INTEGER)")
    conn.execute("CREATE TABLE orders(sku TEXT, qty INTEGER)")
    for i in range(rng.randint(6, 10)):
        conn.execute("INSERT INTO item VALUES (?,?,?,?)", (f"SKU{i:03d}", rng.randint(0, 30), rng.randint(5, 25), rng.randint(2, 40)))
    conn.commit()


def make_tools(conn):
    def list_items():
        return [{"sku": s, "stock": st, "reorder": r} for s, st, r in conn.execute("SELECT sku, stock, reorder FROM item ORDER BY sku")]

    def get_price(sku):
        row = conn.execute("SELECT price FROM item WHERE sku=?", (sku,)).fetchone()
        return {"error": "unknown sku"} if row is None else {"price": row[0]}

    def order(sku, qty):
        if int(qty) <= 0:
            return {"error": "qty must be positive"}
        conn.execute("INSERT INTO orders VALUES (?,?)", (sku, int(qty)))
        return {"ok": True}

    return {"list_items": list_items, "get_price": get_price, "order": order}


def propose(conn, rng, difficulty):
    target = rng.randint(1, 5) * difficulty
    need = {s: r + target - st for s, st, r in conn.execute("SELECT sku, stock, reorder FROM item") if st < r}
    if not need:
        return None
    cost = sum(q * conn.execute("SELECT price FROM item WHERE sku=?", (s,)).fetchone()[0] for s, q in need.items())
    prompt = (f"Restock: every item below its reorder level must be ordered up to reorder level + {target}, "
              "nothing else may be ordered. Answer {\\"total_cost\\": <int>}.")
    return {"target": target}, {"cost": cost, "need": need}, prompt


def leaks(hidden):
    return [str(hidden["cost"])]


def solve(tools, params, rng):
    total = 0
    for it in tools.list_items():
        if it["stock"] < it["reorder"]:
            qty = it["reorder"] + params["target"] - it["stock"]
            if rng is not None and rng.random() < 0.05:
                qty = qty + 1
            tools.order(sku=it["sku"], qty=qty)
            total = total + qty * tools.get_price(sku=it["sku"])["price"]
    return {"total_cost": total}


def verify(conn, params, hidden, answer):
    got = {}
    for s, q in conn.execute("SELECT sku, qty FROM orders"):
        got[s] = got.get(s, 0) + q
    if got != hidden["need"]:
        return False, "orders do not match the restock rule"
    if not isinstance(answer, dict) or answer.get("total_cost") != hidden["cost"]:
        return False, "wrong total cost"
    return True, "ok"
'''


class FakeOpenAI(BaseHTTPRequestHandler):
    """Writes the inventory family when asked for an environment; as a solver, searches once then answers."""
    answers: dict = {}
    requests: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "fake-policy"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append(req)
        msgs = req["messages"]
        if "environment-synthesis agent" in msgs[0]["content"]:
            if len([m for m in msgs if m["role"] == "user"]) == 1:      # first draft: a forbidden import
                content = "```python\nimport os\n" + INVENTORY + "```"
            else:
                content = "Fixed.\n```python\n" + INVENTORY + "```"
            msg = {"role": "assistant", "content": content}
        elif not any(m["role"] == "tool" for m in msgs):
            q = msgs[0]["content"].split(" Use the search")[0]
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": q})}}]}
        else:
            answer = FakeOpenAI.answers.get(msgs[0]["content"].split("\n")[0], "nobody")
            msg = {"role": "assistant", "content": json.dumps({"answer": answer})}
        self._send({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    FakeOpenAI.requests.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_static_checks():
    assert static_problems(INVENTORY) == []
    assert "import of os" in static_problems("import os\n" + INVENTORY)
    assert any("missing verify" in p for p in static_problems(INVENTORY.replace("def verify", "def check")))
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"


def test_client_picks_the_served_model(server):
    c = OpenAIClient(server)
    assert c.model == "fake-policy"


@requires_bwrap
def test_model_written_family_goes_through_the_gates(server, tmp_path):
    cfg = presets.tiny().synth
    cfg.agent_classes, cfg.llm_endpoint = ["general"], server
    cfg.tasks_per_class, cfg.envs_per_class, cfg.pass_k = 8, 4, 4
    summary = synthesize(cfg, tmp_path, llm_family_count=1)
    assert summary["llm_families"] == ["llm:warehouse_inventory_restocking"]
    # The first draft imported os and was sent back with the problem; the second was accepted.
    synth_reqs = [r for r in FakeOpenAI.requests if "environment-synthesis" in r["messages"][0]["content"]]
    assert len(synth_reqs) == 2 and "import of os" in synth_reqs[1]["messages"][-1]["content"]
    tasks = load_tasks(tmp_path)
    llm = [t for t in tasks if t.source == "llm"]
    assert llm and all(t.family == "llm:warehouse_inventory_restocking" and all(t.gates.values()) for t in llm)
    assert {f["function"]["name"] for f in llm[0].tools} == {"list_items", "get_price", "order"}


@requires_bwrap
def test_chat_solver_uses_sandboxed_tools(server, tmp_path, sandbox):
    build_corpus(tmp_path / "search" / "corpus.jsonl", None, limit=200)
    agent = SearchAgent()
    draft = agent.build_env("s-9", "institutes", 9, 2, tmp_path / "envs" / "s-9",
                            {"sandbox": sandbox, "corpus": tmp_path / "search" / "corpus.jsonl"})
    tasks = json.loads((draft.dir / "tasks.json").read_text())
    FakeOpenAI.answers = {c.prompt.split("\n")[0]: tasks[c.key]["answer"] for c in draft.candidates[:1]}
    report = validate_env(agent, draft, sandbox, ChatSolver(server), 2, 9)
    kept = {t.key: t for t in report.kept}
    assert draft.candidates[0].key in kept and kept[draft.candidates[0].key].pass_c == 2
    assert draft.candidates[1].key not in kept and report.rejected == {"solvable": 1}
    tool_msgs = [m for r in FakeOpenAI.requests for m in r["messages"] if m["role"] == "tool"]
    assert tool_msgs and all("snippet" in m["content"] for m in tool_msgs)   # real search results came back
