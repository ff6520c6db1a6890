"""The `dsaforge` command line.

  dsaforge run end-to-end --preset tiny            the whole pipeline on KFP's local runner, tracked in MLflow
  dsaforge stage prepare-data --out DIR            one stage in-process (no KFP), for debugging
  dsaforge config show|schema|diff                 resolved configs, the JSON schema, differences
  dsaforge pipelines list|compile                  available pipelines; KFP IR YAML for a cluster
  dsaforge mlflow ui                               MLflow's UI on 127.0.0.1 over the local store
  dsaforge eval compare RUN RUN [...]              evaluation metrics of MLflow runs side by side
Exit status: 0 on success; 2 for bad input (config, files, unreachable servers); 1 for other failures.
`--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny (CPU), small (one H200), v32 (DeepSeek-V3.2 size), base")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file(s) layered on the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one field, e.g. --set model.n_layers=4 (repeatable)")


def _load(args):
    from dsaforge.config import load_config

    return load_config(args.preset or ("tiny" if not args.config else None), args.config, args.sets)


def cmd_run(args) -> int:
    from dsaforge.runner import run_local, stage_highlights
    from dsaforge.tracking import default_tracking_uri

    cfg = _load(args)
    result = run_local(args.pipeline, cfg)
    print(f"\npipeline {result.name} finished in {result.seconds:.0f}s")
    print(f"  outputs:       {result.run_dir}")
    for task, path in result.outputs.items():
        print(f"    {task:<18} {path}")
    highlights = stage_highlights(result.run_dir)
    if highlights:
        print("  results:")
        for task, line in highlights.items():
            print(f"    {task:<18} {line}")
    print(f"  run record:    {result.record}")
    print(f"  MLflow run:    {result.mlflow_run_id}  (store: {result.tracking_uri})")
    default = default_tracking_uri(".dsaforge")           # what `dsaforge mlflow ui` opens from this directory
    ui = f"{_self_command()} mlflow ui" + ("" if result.tracking_uri == default else f" --tracking-uri {result.tracking_uri}")
    print(f"  open the UI:   {ui}")
    return 0


def _self_command() -> str:
    """How the user can call dsaforge again: bare when it is on PATH, else the path that was used."""
    import shutil

    exe = Path(sys.argv[0]).resolve()
    if exe.name == "dsaforge" and shutil.which("dsaforge") and Path(shutil.which("dsaforge")).resolve() == exe:
        return "dsaforge"
    venv_exe = Path(sys.executable).parent / "dsaforge"
    target = venv_exe if venv_exe.exists() else exe
    try:
        return str(target.relative_to(Path.cwd()))
    except ValueError:
        return str(target)


def cmd_stage(args) -> int:
    from dsaforge.stages import get_stage, run_stage
    from dsaforge.tracking import NullTracker, start_stage_run

    cfg = _load(args)
    get_stage(args.name)
    inputs = {}
    for item in args.input:
        if "=" not in item:
            raise _UsageError(f"--input {item!r}: expected STAGE=DIR")
        key, value = item.split("=", 1)
        inputs[key] = Path(value)
    tracker = NullTracker() if args.no_track else start_stage_run(cfg, args.name, parent_run_id=args.parent_run_id)
    try:
        summary = run_stage(args.name, cfg, Path(args.out), inputs, tracker)
    except BaseException:
        if hasattr(tracker, "finish"):
            tracker.finish("FAILED")
        raise
    if hasattr(tracker, "finish"):
        tracker.finish("FINISHED")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_config(args) -> int:
    from dsaforge.config import Config, diff, load_config, to_yaml

    if args.action == "show":
        cfg = _load(args)
        print(json.dumps(cfg.model_dump(), indent=2) if args.format == "json" else to_yaml(cfg), end="")
    elif args.action == "schema":
        text = json.dumps(Config.model_json_schema(), indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
            print(f"wrote {args.out}")
        else:
            print(text)
    else:
        if len(args.targets) != 2:
            raise _UsageError("config diff needs two presets or YAML files, e.g. `dsaforge config diff tiny small`")
        a, b = (load_config(None, [t]) if t.endswith((".yaml", ".yml")) else load_config(t) for t in args.targets)
        rows = diff(a, b)
        width = max((len(k) for k, _, _ in rows), default=0)
        for key, va, vb in rows:
            print(f"{key:<{width}}  {va!r} -> {vb!r}")
        if not rows:
            print("no differences")
    return 0


def cmd_pipelines(args) -> int:
    from dsaforge.pipelines import PIPELINES

    if args.action == "list":
        for name, module in PIPELINES.items():
            doc = (sys.modules.get(module) or __import__(module, fromlist=["_"])).__doc__ or ""
            print(f"{name:<14} {doc.strip().splitlines()[0] if doc else ''}")
        return 0
    from dsaforge.runner import compile_pipeline

    cfg = _load(args)
    names = list(PIPELINES) if not args.names else args.names
    for name in names:
        out = compile_pipeline(name, cfg, Path(args.out) / f"{name}.yaml")
        print(f"compiled {name} -> {out}")
    return 0


def cmd_mlflow(args) -> int:
    from dsaforge.tracking import resolve_tracking_uri

    cfg = _load(args)
    uri = args.tracking_uri or resolve_tracking_uri(cfg)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://127.0.0.1:{args.port}  (store: {uri}); Ctrl-C to stop", flush=True)
    os.execv(sys.executable, cmd)
    return 0


def cmd_eval(args) -> int:
    from dsaforge.eval.compare import compare
    from dsaforge.tracking import resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(_load(args))
    print(compare(uri, args.runs, Path(args.out) if args.out else None, args.prefix))
    if args.out:
        print(f"wrote {args.out}")
    return 0


class _UsageError(Exception):
    """Arguments that parse but make no sense together; reported like other bad input."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsaforge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"dsaforge {__import__('dsaforge').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline on KFP's local runner, tracked in MLflow")
    p.add_argument("pipeline", help="pipeline name (see `dsaforge pipelines list`)")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", help="run one stage in-process (no KFP), for debugging")
    p.add_argument("name", help="stage name, e.g. prepare-data")
    p.add_argument("--out", required=True, help="output directory of the stage (must be new or empty)")
    p.add_argument("--input", action="append", default=[], metavar="STAGE=DIR",
                   help="an upstream stage's output directory (repeatable)")
    p.add_argument("--parent-run-id", default=None, help="attach to this MLflow pipeline run as a child")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    _config_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("config", help="show, export the schema of, or diff configs")
    p.add_argument("action", choices=["show", "schema", "diff"])
    p.add_argument("targets", nargs="*", help="for diff: two presets or YAML files")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--out", default=None, help="for schema: write to this file")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("pipelines", help="list pipelines or compile them to KFP IR YAML")
    p.add_argument("action", choices=["list", "compile"])
    p.add_argument("names", nargs="*", help="pipelines to compile (default: all)")
    p.add_argument("--out", default="build/pipelines", help="output directory for compiled YAML")
    _config_args(p)
    p.set_defaults(func=cmd_pipelines)

    p = sub.add_parser("mlflow", help="MLflow helpers")
    p.add_argument("action", choices=["ui"])
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", default=None, help="default: the configured store")
    _config_args(p)
    p.set_defaults(func=cmd_mlflow)

    p = sub.add_parser("eval", help="evaluation helpers: compare runs")
    p.add_argument("action", choices=["compare"])
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluate-stage or pipeline MLflow run ids (two or more)")
    p.add_argument("--out", default=None, help="also write the table to this .md, .csv or .json file")
    p.add_argument("--prefix", default="eval/", help="metrics whose names start with this (default eval/)")
    p.add_argument("--tracking-uri", default=None, help="default: the configured store")
    _config_args(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dsaforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns errors into a line and an exit status
        if args.debug:
            raise
        from dsaforge.config import ConfigError
        from dsaforge.data.ingest import DataError

        bad_input = isinstance(e, (ConfigError, DataError, FileNotFoundError, _UsageError))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dsaforge: error: {msg}" + ("" if bad_input else f" ({type(e).__name__}; --debug for the traceback)"),
              file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
