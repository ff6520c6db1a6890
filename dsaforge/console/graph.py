"""A pipeline's stage graph, read from its compiled KFP IR (what a cluster would run), laid out as an SVG.

Reading the IR rather than the Python keeps the graph true to the pipeline: tasks inside groups (the exit handler)
are flattened, and a task that waits on a group (close-run) waits on the group's last tasks.
"""
from __future__ import annotations

import html
import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[str]                                  # task names, in topological order
    edges: list[tuple[str, str]]
    always: set[str] = field(default_factory=set)     # tasks that run whatever happened upstream (exit handlers)

    def layers(self) -> dict[str, int]:
        depth = {n: 0 for n in self.nodes}
        for n in self.nodes:                          # nodes are topologically ordered
            for a, b in self.edges:
                if a == n:
                    depth[b] = max(depth[b], depth[a] + 1)
        return depth


def from_ir(ir: dict) -> Graph:
    components = ir.get("components", {})
    nodes: list[str] = []
    edges: list[tuple[str, str]] = []
    always: set[str] = set()

    def walk(dag: dict) -> tuple[list[str], list[str]]:
        """Add a DAG's tasks; return its entry and exit tasks (for edges into and out of a group)."""
        tasks = dag.get("tasks", {})
        first: dict[str, list[str]] = {}
        last: dict[str, list[str]] = {}
        for key, task in tasks.items():
            sub = components.get(task.get("componentRef", {}).get("name", ""), {})
            if "dag" in sub:
                first[key], last[key] = walk(sub["dag"])
            else:
                name = task.get("taskInfo", {}).get("name", key)
                nodes.append(name)
                first[key] = last[key] = [name]
                if task.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED":
                    always.add(name)
        needed: set[str] = set()
        for key, task in tasks.items():
            deps = set(task.get("dependentTasks", []))
            for spec in task.get("inputs", {}).get("artifacts", {}).values():
                deps.add(spec.get("taskOutputArtifact", {}).get("producerTask"))
            for spec in task.get("inputs", {}).get("parameters", {}).values():
                deps.add(spec.get("taskOutputParameter", {}).get("producerTask"))
            for dep in sorted(d for d in deps if d in tasks):
                needed.add(dep)
                edges.extend((a, b) for a in last[dep] for b in first[key])
        entry = [n for k in tasks if not (set(tasks[k].get("dependentTasks", [])) & set(tasks)) for n in first[k]]
        exits = [n for k in tasks if k not in needed for n in last[k]]
        return entry, exits

    walk(ir.get("root", {}).get("dag", {}))
    edges = sorted(set(edges), key=lambda e: (nodes.index(e[0]), nodes.index(e[1])))
    order = _toposort(nodes, edges)
    edges = _reduce(edges)
    info = ir.get("pipelineInfo", {})
    return Graph(info.get("name", ""), info.get("description", ""), order, edges, always)


def _reduce(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop an edge a->c where a longer path a->...->c exists: every task takes the parent run id from open-run,
    but drawing that edge to each of them says nothing the chain does not."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reachable(a: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [b for b in succ.get(a, ()) if (a, b) != skip]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += succ.get(n, ())
        return seen

    return [(a, b) for a, b in edges if b not in reachable(a, (a, b))]


def _toposort(nodes: list[str], edges: list[tuple[str, str]]) -> list[str]:
    indegree = {n: 0 for n in nodes}
    for _, b in edges:
        indegree[b] += 1
    ready = [n for n in nodes if indegree[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for a, b in edges:
            if a == n:
                indegree[b] -= 1
                if indegree[b] == 0:
                    ready.append(b)
    return out


@lru_cache(maxsize=16)
def pipeline_graph(name: str) -> Graph:
    """Compile the pipeline (with the tiny preset: placement does not change the graph) and read its IR."""
    from dsaforge.config import preset
    from dsaforge.runner import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(name, preset("tiny"), Path(tmp) / f"{name}.yaml")
        return from_ir(next(yaml.safe_load_all(path.read_text())))      # then the platform (Kubernetes) spec


_W, _H, _GX, _GY = 120, 34, 40, 16


def to_svg(graph: Graph, states: dict[str, str] | None = None) -> str:
    """Columns by depth, one box per task; `states` (task -> pending/running/succeeded/failed) colours the boxes."""
    states = states or {}
    depth = graph.layers()
    columns: dict[int, list[str]] = {}
    for n in graph.nodes:
        columns.setdefault(depth[n], []).append(n)
    pos = {n: (10 + d * (_W + _GX), 10 + i * (_H + _GY)) for d, col in columns.items() for i, n in enumerate(col)}
    width = 20 + len(columns) * (_W + _GX) - _GX
    height = 20 + max(len(c) for c in columns.values()) * (_H + _GY) - _GY if columns else 40
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="stage graph of {html.escape(graph.name)}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>']
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        dash = ' stroke-dasharray="4 3"' if b in graph.always else ""
        parts.append(f'<line x1="{xa + _W}" y1="{ya + _H / 2}" x2="{xb}" y2="{yb + _H / 2}" class="edge"{dash} '
                     'marker-end="url(#arrow)"/>')
    for n in graph.nodes:
        x, y = pos[n]
        state = states.get(n, "")
        parts.append(f'<g class="node {html.escape(state)}" data-task="{html.escape(n)}"><rect x="{x}" y="{y}" '
                     f'width="{_W}" height="{_H}" rx="6"/><text x="{x + _W / 2}" y="{y + _H / 2 + 4}" '
                     f'text-anchor="middle">{html.escape(n)}</text>'
                     f'<title>{html.escape(n)}{": " + html.escape(state) if state else ""}</title></g>')
    parts.append("</svg>")
    return "".join(parts)


def graph_json(graph: Graph) -> str:
    return json.dumps({"name": graph.name, "nodes": graph.nodes, "edges": graph.edges, "always": sorted(graph.always)})
