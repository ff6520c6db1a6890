"""The console's web routes: server-rendered pages (Jinja2 on Starlette), a little JSON for live updates.

  GET  /healthz                      liveness and readiness (no auth)
  GET  /pipelines                    name, description and stage graph of each pipeline
  GET  /submit?pipeline=&preset=     the form, generated from the config schema; ?from=RUN re-submits with edits
  POST /submit                       validate (one line per field path, as the CLI) and queue
  GET  /runs, /api/runs              runs with status, progress, duration; pick some to compare in MLflow
  GET  /runs/{id}, /api/runs/{id}    steps, artifacts, MLflow links, log tail
  POST /runs/{id}/cancel | resume    stop a run; run a failed one again from its failed step
  GET  /runs/{id}/artifacts/{mlflow run}/{path}   one artifact of the run or of its steps
  GET  /compare?run=ID&run=ID        MLflow's compare view for the chosen runs
  GET|POST /login                    token sign-in when the console is bound beyond 127.0.0.1
"""
from __future__ import annotations

import asyncio
import mimetypes
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dsaforge.config import ConfigError, PRESETS, load_config, validate
from dsaforge.console import forms
from dsaforge.console.core import Console, Settings, age, when
from dsaforge.console.graph import pipeline_graph, to_svg
from dsaforge.console.security import (CSRF_COOKIE, SESSION_COOKIE, Forbidden, Guard, csrf_token, read_form)
from dsaforge.console.status import stage_tasks
from dsaforge.console.store import FAILED, Run

STATIC = Path(__file__).parent / "static"
_env = Environment(loader=PackageLoader("dsaforge.console", "templates"), autoescape=select_autoescape(["html"]))
_env.globals.update(age=age, when=when)
_env.filters["pct"] = lambda x: f"{100 * x:.0f}%"


def _pipelines() -> dict[str, str]:
    from dsaforge.pipelines import PIPELINES

    return {name: pipeline_graph(name).description for name in PIPELINES}


class _AuthMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        guard: Guard = request.app.state.guard
        if guard.is_public(request.url.path) or guard.authenticated(request):
            return await call_next(request)
        given = request.query_params.get("token")
        if request.method == "GET" and given and guard.check_token(given):
            # A printed sign-in link (?token=...): trade it for the session cookie and drop it from the URL.
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            _set_session(response, guard)
            return response
        if request.url.path.startswith("/api/") or request.headers.get("authorization"):
            return JSONResponse({"error": "authentication required: send Authorization: Bearer TOKEN"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)


def _set_session(response: Response, guard: Guard) -> None:
    response.set_cookie(SESSION_COOKIE, guard.session_value(), httponly=True, samesite="strict", path="/")


def _page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    csrf, new = csrf_token(request)
    console: Console = request.app.state.console
    body = _env.get_template(template).render(request=request, csrf=csrf, console=console,
                                               auth=request.app.state.guard.enabled, **context)
    response = HTMLResponse(body, status_code=status_code, headers=_PAGE_HEADERS)
    if new:
        response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
    return response


# Pages load nothing from elsewhere and may not be framed (clickjacking the cancel button).
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                            "frame-ancestors 'none'; base-uri 'none'",
                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


def _error(request: Request, status_code: int, message: str) -> HTMLResponse:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code)
    return _page(request, "error.html", status_code=status_code, message=message)


async def _run_or_404(request: Request) -> Run:
    run = request.app.state.console.get(request.path_params["run_id"])
    if run is None:
        raise _NotFound(f"no run {request.path_params['run_id'][:40]!r}")
    return run


class _NotFound(Exception):
    pass


async def healthz(request: Request) -> Response:
    console: Console = request.app.state.console
    alive = console._thread is not None and console._thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "queue stopped", "backends": list(console.backends)},
                        200 if alive else 503)


async def index(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=303)


async def pipelines(request: Request) -> Response:
    items = []
    for name in _pipelines():
        graph = await asyncio.to_thread(pipeline_graph, name)
        items.append({"name": name, "description": graph.description, "svg": to_svg(graph),
                      "stages": stage_tasks(graph), "inputs": graph.inputs})
    return _page(request, "pipelines.html", pipelines=items)


def _submit_page(request: Request, pipeline: str, preset: str, values: dict[str, str], backend: str = "local",
                 error: str = "", status_code: int = 200, source: Optional[Run] = None) -> Response:
    bad = {f.path for f in forms.form_fields() if error and (f.path + ":") in error}
    sections: dict[str, list] = {}
    for f in forms.form_fields():
        if f.path not in forms.LOCKED:
            sections.setdefault(f.section, []).append(f)
    inputs = pipeline_graph(pipeline).inputs
    sources = [r for r in request.app.state.console.store.list() if r.backend == "local" and not r.active] if inputs else []
    return _page(request, "submit.html", status_code=status_code, pipelines=_pipelines(), pipeline=pipeline,
                 inputs=inputs, sources=sources,
                 presets=list(PRESETS), preset=preset, sections=sections, values=values, error=error, bad=bad,
                 backend=backend, source=source, locked={p: _locked_value(request.app.state.console, p)
                                                         for p in forms.LOCKED})


def _locked_value(console: Console, path: str) -> str:
    return {"pipeline.home": str(console.home), "tracking.uri": console.tracking_uri}.get(path, "")


async def submit_form(request: Request) -> Response:
    console: Console = request.app.state.console
    pipeline = request.query_params.get("pipeline") or next(iter(_pipelines()))
    if pipeline not in _pipelines():
        return _error(request, 404, f"unknown pipeline {pipeline!r}; available: {', '.join(_pipelines())}")
    source = None
    if "from" in request.query_params:
        source = console.get(request.query_params["from"])
        if source is None:
            return _error(request, 404, f"no run {request.query_params['from'][:40]!r} to re-submit")
        cfg = validate(source.config, where=f"run {source.id[:8]}")
        return _submit_page(request, source.pipeline, cfg.preset, forms.form_values(cfg), source.backend, source=source)
    preset = request.query_params.get("preset", "tiny")
    try:
        cfg = load_config(preset)
    except ConfigError as e:
        return _error(request, 400, str(e))
    return _submit_page(request, pipeline, preset, forms.form_values(cfg))


async def submit(request: Request) -> Response:
    console: Console = request.app.state.console
    fields = dict(await read_form(request, request.app.state.guard))
    pipeline, preset = fields.get("pipeline_name", ""), fields.get("preset", "tiny")
    backend = fields.get("backend", "local")
    source = console.get(fields["resubmit_of"]) if fields.get("resubmit_of") else None
    values = {k: v for k, v in fields.items()
              if k not in ("csrf", "pipeline_name", "backend", "resubmit_of", "inputs_from")}
    try:
        if pipeline not in _pipelines():
            raise ConfigError(f"unknown pipeline {pipeline!r}; available: {', '.join(_pipelines())}")
        cfg = forms.config_from_form(values)
        run = console.submit(pipeline, cfg, backend, inputs_from=fields.get("inputs_from") or None,
                             resubmit_of=source.id if source else None)
    except ConfigError as e:
        shown = {**forms.form_values(load_config(preset if preset in PRESETS else "tiny")),
                 **{k: v for k, v in values.items() if k != "preset"}}
        return _submit_page(request, pipeline if pipeline in _pipelines() else next(iter(_pipelines())),
                            preset, shown, backend, error=str(e), status_code=400, source=source)
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse({"id": run.id, "url": f"/runs/{run.id}"}, 201)
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


def _run_row(console: Console, run: Run, status=None) -> dict:
    row = {"id": run.id, "pipeline": run.pipeline, "backend": run.backend, "preset": run.preset,
           "status": run.status, "created": run.created, "started": run.started, "finished": run.finished,
           "seconds": run.seconds, "error": run.error, "note": run.note, "remote_url": run.remote_url,
           "resubmit_of": run.resubmit_of}
    if status is not None:
        row.update(progress=status.progress, mlflow_run_id=status.parent_run_id,
                   mlflow_experiment_id=status.experiment_id, tracking_error=status.error,
                   steps=[{"name": s.name, "state": s.state, "seconds": s.seconds, "progress": s.progress,
                           "error": s.error, "mlflow_run_id": s.mlflow_run_id, "highlights": s.highlights}
                          for s in status.steps])
        if status.parent_run_id:
            row["mlflow_url"] = console.mlflow_run_url(status.experiment_id, status.parent_run_id)
    return row


async def runs_page(request: Request) -> Response:
    console: Console = request.app.state.console
    runs = console.store.list()
    statuses = await asyncio.to_thread(lambda: {r.id: console.status(r) for r in runs[:50]})
    return _page(request, "runs.html", runs=runs, statuses=statuses)


async def api_runs(request: Request) -> Response:
    console: Console = request.app.state.console
    runs = console.store.list()
    rows = await asyncio.to_thread(lambda: [_run_row(console, r, console.status(r)) for r in runs[:50]])
    return JSONResponse({"runs": rows + [_run_row(console, r) for r in runs[50:]]})


async def run_page(request: Request) -> Response:
    console: Console = request.app.state.console
    run = await _run_or_404(request)
    status = await asyncio.to_thread(console.status, run)
    artifacts = await asyncio.to_thread(_artifacts, console, status)
    graph = pipeline_graph(run.pipeline)
    return _page(request, "run.html", run=run, status=status, artifacts=artifacts,
                 svg=to_svg(graph, status.states()), log=console.log_tail(run),
                 can_resume=run.status == FAILED and run.backend == "local",
                 mlflow_url=console.mlflow_run_url(status.experiment_id, status.parent_run_id)
                 if status.parent_run_id else None)


async def api_run(request: Request) -> Response:
    console: Console = request.app.state.console
    run = await _run_or_404(request)
    status = await asyncio.to_thread(console.status, run)
    row = _run_row(console, run, status)
    row["log_tail"] = console.log_tail(run)
    row["config"] = run.config
    return JSONResponse(row)


def _artifacts(console: Console, status) -> list[dict]:
    """Artifact files of the parent run and of each step's run (reports, plots, configs)."""
    from dsaforge.tracking_query import list_run_artifacts

    owners = ([("pipeline", status.parent_run_id)] if status.parent_run_id else [])
    owners += [(s.name, s.mlflow_run_id) for s in status.steps if s.mlflow_run_id]
    out = []
    for owner, run_id in owners:
        try:
            paths = list_run_artifacts(console.tracking_uri, run_id)
        except Exception:  # noqa: BLE001 - an artifact store that cannot be listed shows no artifacts
            continue
        out += [{"owner": owner, "run_id": run_id, "path": p} for p in paths]
    return out


_INLINE = {"image/png", "image/jpeg", "image/svg+xml", "text/plain", "application/json", "text/markdown",
           "text/csv", "text/html"}


async def artifact(request: Request) -> Response:
    """One artifact, only if it belongs to this run and MLflow lists it: no path from the URL is opened as such."""
    console: Console = request.app.state.console
    run = await _run_or_404(request)
    status = await asyncio.to_thread(console.status, run)
    listed = {(a["run_id"], a["path"]) for a in await asyncio.to_thread(_artifacts, console, status)}
    key = (request.path_params["mlflow_run_id"], request.path_params["path"])
    if key not in listed:
        return _error(request, 404, f"run {run.id[:8]} has no artifact {key[1]!r}")
    from dsaforge.tracking_query import download_run_artifact

    with tempfile.TemporaryDirectory() as tmp:
        local = await asyncio.to_thread(download_run_artifact, console.tracking_uri, *key, tmp)
        body = local.read_bytes()
    ctype = mimetypes.guess_type(key[1])[0] or "application/octet-stream"
    if key[1].endswith((".md", ".yaml", ".yml", ".jsonl", ".log")):
        ctype = "text/plain"
    headers = {"X-Content-Type-Options": "nosniff",
               # An HTML report renders, but sandboxed: no scripts, no access to the console's origin.
               "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"}
    if ctype not in _INLINE:
        headers["Content-Disposition"] = f'attachment; filename="{Path(key[1]).name}"'
    if ctype.startswith("text/"):
        ctype += "; charset=utf-8"
    return Response(body, media_type=ctype, headers=headers)


async def cancel(request: Request) -> Response:
    await read_form(request, request.app.state.guard)
    console: Console = request.app.state.console
    run = await _run_or_404(request)
    try:
        await asyncio.to_thread(console.cancel, run)
    except ConfigError as e:
        return _error(request, 409, str(e))
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


async def resume(request: Request) -> Response:
    await read_form(request, request.app.state.guard)
    console: Console = request.app.state.console
    run = await _run_or_404(request)
    try:
        new = await asyncio.to_thread(console.resume, run)
    except ConfigError as e:
        return _error(request, 409, str(e))
    return RedirectResponse(f"/runs/{new.id}", status_code=303)


async def compare(request: Request) -> Response:
    console: Console = request.app.state.console
    ids = request.query_params.getlist("run")
    if len(ids) < 2:
        return _error(request, 400, "choose at least two runs to compare")
    pairs = []
    for run_id in ids:
        run = console.get(run_id)
        if run is None:
            return _error(request, 404, f"no run {run_id[:40]!r}")
        status = await asyncio.to_thread(console.status, run)
        if not status.parent_run_id:
            return _error(request, 409, f"run {run.id[:8]} has no MLflow run yet")
        pairs.append((status.experiment_id, status.parent_run_id))
    return RedirectResponse(console.mlflow_compare_url(pairs), status_code=303)


async def login_page(request: Request) -> Response:
    return _page(request, "login.html", next=_safe_next(request.query_params.get("next", "/runs")), error="")


def _safe_next(target: str) -> str:
    # Only a path on this console: never an absolute URL or a scheme-relative one (open redirect).
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/runs"


async def login(request: Request) -> Response:
    guard: Guard = request.app.state.guard
    fields = dict(await read_form(request, guard))
    target = _safe_next(fields.get("next", "/runs"))
    if not guard.enabled:
        return RedirectResponse(target, status_code=303)
    if not guard.check_token(fields.get("token", "")):
        return _page(request, "login.html", status_code=401, next=target, error="wrong token")
    response = RedirectResponse(target, status_code=303)
    _set_session(response, guard)
    return response


async def _forbidden(request: Request, exc: Forbidden) -> Response:
    return _error(request, 403, str(exc))


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, str(exc) if isinstance(exc, _NotFound) else "no such page")


def create_app(settings: Settings) -> Starlette:
    console = Console(settings)

    @asynccontextmanager
    async def lifespan(app):
        console.start()
        try:
            yield
        finally:
            console.stop()

    routes = [
        Route("/healthz", healthz),
        Route("/", index),
        Route("/pipelines", pipelines),
        Route("/submit", submit_form, methods=["GET"]),
        Route("/submit", submit, methods=["POST"]),
        Route("/runs", runs_page),
        Route("/api/runs", api_runs),
        Route("/runs/{run_id}", run_page),
        Route("/api/runs/{run_id}", api_run),
        Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
        Route("/runs/{run_id}/resume", resume, methods=["POST"]),
        Route("/runs/{run_id}/artifacts/{mlflow_run_id}/{path:path}", artifact),
        Route("/compare", compare),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_AuthMiddleware)], lifespan=lifespan,
                    exception_handlers={Forbidden: _forbidden, _NotFound: _not_found, 404: _not_found})
    app.state.console = console
    app.state.guard = Guard(settings.token)
    return app
