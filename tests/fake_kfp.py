"""A small Kubeflow Pipelines API server (the v2beta1 REST calls kfp.Client makes for submit and runs), recording
every request, so that the CLI is tested through the real kfp.Client and its HTTP client, never a mock of it."""
import json
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import free_port

API = "/apis/v2beta1"
NOW = "2026-12-04T15:00:00Z"


class FakeKfp:
    def __init__(self, token=None):
        self.token = token
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urllib.parse.urlparse(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                fake.requests.append({"method": method, "path": url.path, "query": query, "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()}})
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self._send(401, {"error": "unauthenticated", "code": 16})
                code, out = fake.route(method, url.path, query, body)
                self._send(code, out)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    def route(self, method, path, query, body):
        if not path.startswith(API):
            return 404, {"error": "not found"}
        path = path[len(API):]
        if path == "/healthz":
            return 200, {"commit_sha": "fake", "tag_name": "2.17.0", "multi_user": False}
        if path == "/experiments" and method == "POST":
            exp = {"experiment_id": uuid.uuid4().hex, "display_name": body["display_name"],
                   "namespace": body.get("namespace") or "", "created_at": NOW, "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == "/experiments":
            exps = list(self.experiments.values())
            if "filter" in query:
                for p in json.loads(query["filter"])["predicates"]:
                    exps = [e for e in exps if e[p["key"]] == p.get("stringValue", p.get("string_value"))]
            return 200, {"experiments": exps, "total_size": len(exps)} if exps else {}
        if path == "/runs" and method == "POST":
            run = {**body, "run_id": uuid.uuid4().hex, "state": "PENDING", "created_at": NOW,
                   "storage_state": "AVAILABLE"}
            self.runs[run["run_id"]] = run
            return 200, run
        if path == "/runs":
            runs = [r for r in self.runs.values()
                    if not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"]]
            runs = runs[: int(query.get("page_size", 10))]
            return 200, {"runs": [{k: v for k, v in r.items() if k != "pipeline_spec"} for r in runs],
                         "total_size": len(runs)} if runs else {}
        run_id, _, action = path.removeprefix("/runs/").partition(":")
        if path.startswith("/runs/") and run_id in self.runs:
            run = self.runs[run_id]
            if action == "terminate" and method == "POST":
                run["state"] = "CANCELING"
                return 200, {}
            if not action and method == "GET":
                return 200, run
        return 404, {"error": f"run {run_id} not found", "code": 5}

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
