"""The `dsaforge` command line.

  dsaforge run end-to-end --preset tiny            the whole pipeline on KFP's local runner, tracked in MLflow
  dsaforge stage prepare-data --out DIR            one stage in-process (no KFP), for debugging
  dsaforge config show|schema|diff                 resolved configs, the JSON schema, differences
  dsaforge pipelines list|compile                  available pipelines; KFP IR YAML for a cluster
  dsaforge submit end-to-end --host URL            start a run on a Kubeflow Pipelines cluster
  dsaforge runs list|get|cancel --host URL         the cluster's runs
  dsaforge plan --preset v32 --gpus 64 --gpu-mem 141  per-GPU memory of each parallel layout, and which to use
  dsaforge mlflow ui                               MLflow's UI on 127.0.0.1 over the local store
  dsaforge eval compare RUN RUN [...]              evaluation metrics of MLflow runs side by side
  dsaforge generate --checkpoint DIR --prompts F   complete prompts (or roll out --tasks) into Parquet
  dsaforge tracking replay SPOOL                   log what a stage kept on disk while tracking was down
  dsaforge ui                                      the web console: submit, follow, cancel, resume, compare
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
    p.add_argument("--preset", default=None,
                   help="tiny (CPU), small (one H200), h200 (V3.2's attention block, one H200), "
                        "v32 (DeepSeek-V3.2 size), base")
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
    if args.resume and not (args.preset or args.config):
        # the resumed run's own config, with --set applied on top (e.g. the fix for what failed)
        from dsaforge.config import load_config
        from dsaforge.records import find_record

        home = Path(cfg.pipeline.home).resolve()
        cfg = load_config(None, [str(find_record(home, args.resume) / "config.yaml")], args.sets)
    result = run_local(args.pipeline, cfg, reuse=_inputs(args.input), resume=args.resume)
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
    from dsaforge.stages import run_stage
    from dsaforge.tracking import stage_run

    cfg = _load(args)
    inputs = {}
    for item in args.input:
        if "=" not in item:
            raise _UsageError(f"--input {item!r}: expected STAGE=DIR")
        key, value = item.split("=", 1)
        inputs[key] = Path(value)
    with stage_run(cfg, args.name, parent_run_id=args.parent_run_id, enabled=not args.no_track,
                   out_dir=Path(args.out)) as tracker:
        summary = run_stage(args.name, cfg, Path(args.out), inputs, tracker)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _inputs(items) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise _UsageError(f"--input {item!r}: expected STAGE=URI")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def cmd_submit(args) -> int:
    from dsaforge.cluster import kfp_host, submit

    cfg = _load(args)
    host = kfp_host(cfg, args.host)
    result = submit(args.pipeline, cfg, host, experiment=args.experiment, reuse=_inputs(args.input),
                    run_name=args.run_name, namespace=args.namespace)
    print(f"submitted {args.pipeline} to {host}")
    print(f"  run:  {result.run_id}")
    print(f"  link: {result.url}")
    return 0


def cmd_runs(args) -> int:
    from dsaforge import cluster

    host = cluster.kfp_host(None, args.host)
    if args.action == "list":
        rows = cluster.list_runs(host, args.experiment, args.limit, args.namespace)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['run_id']:<38} {r['state']:<10} {r['created'][:19]:<20} {r['name']}")
        if not rows:
            print("no runs")
        return 0
    if not args.run_id:
        raise _UsageError(f"runs {args.action} needs a RUN_ID")
    if args.action == "get":
        row = cluster.get_run(host, args.run_id)
        if args.format == "json":
            print(json.dumps(row, indent=2))
        else:
            for key in ("run_id", "name", "state", "created", "finished", "error", "url"):
                if row[key]:
                    print(f"{key + ':':<10} {row[key]}")
            for task, state in row["tasks"].items():
                print(f"  {task:<24} {state}")
        return 0
    cluster.cancel_run(host, args.run_id)
    print(f"cancelled {args.run_id}")
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

    from dsaforge.pipelines import builder, get_pipeline

    cfg = _load(args)
    reuse = _inputs(args.input)
    for name in args.names or list(PIPELINES):
        missing = [i for i in builder.external_inputs(get_pipeline(name).STAGES) if i not in reuse]
        if missing and not args.names:      # compiling everything: a sub-pipeline needs its upstream outputs
            print(f"skipped {name}: it starts from earlier outputs; compile it with "
                  + " ".join(f"--input {i}=URI" for i in missing))
            continue
        out = compile_pipeline(name, cfg, Path(args.out) / f"{name}.yaml", reuse=reuse)
        print(f"compiled {name} -> {out}")
    return 0


def cmd_plan(args) -> int:
    from dsaforge.model.train.plan import format_table, plan

    cfg = _load(args)
    rows, best = plan(cfg, args.gpus, args.gpu_mem, args.seq_len, args.stage)
    seq_len = args.seq_len or getattr(cfg.train, args.stage).seq_len
    print(f"{cfg.preset or 'config'}: {args.stage} stage, {args.gpus} GPUs x {args.gpu_mem:g} GiB, seq_len {seq_len}, "
          f"micro-batch {getattr(cfg.train, args.stage).micro_batch_size}, activation checkpointing "
          f"{'on' if cfg.train.activation_checkpointing else 'off'}")
    print(format_table(rows, best, args.gpu_mem, cfg.train.activation_checkpointing))
    return 0 if best is not None else 2


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
def cmd_generate(args) -> int:
    from dsaforge.model.sampling import SamplingParams
    from dsaforge.rollout.generate import PromptEpisode, engine_policy, generate, load_prompts
    from dsaforge.rollout.runner import RolloutConfig

    if bool(args.prompts) == bool(args.tasks):
        raise _UsageError("give exactly one of --prompts FILE or --tasks DIR")
    if bool(args.checkpoint) == bool(args.server):
        raise _UsageError("give exactly one of --checkpoint DIR (in-process engine) or --server URL")
    cfg = _load(args)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
        rollout = RolloutConfig(max_turns=args.max_turns, context=args.context, context_budget=args.context_budget)
    except ValueError as e:
        raise _UsageError(str(e)) from e
    if args.tasks:
        from dsaforge.synth.episode import make_episode
        from dsaforge.synth.task import load_tasks

        tasks = load_tasks(Path(args.tasks), split=args.split)[: args.limit]
        if not tasks:
            raise _UsageError(f"no tasks in {args.tasks}" + (f" with split {args.split!r}" if args.split else ""))
        episodes = [make_episode(t, cfg.synth.sandbox) for t in tasks]
    else:
        episodes = [PromptEpisode(i, r) for i, r in enumerate(load_prompts(Path(args.prompts))[: args.limit])]
    if args.server:
        from dsaforge.rollout.openai import LIMITS, OpenAIPolicy

        policy = OpenAIPolicy(args.server, params, model=args.model, max_context=args.max_len or 131072)
        print(f"dsaforge: {LIMITS}", file=sys.stderr)
    else:
        policy = engine_policy(Path(args.checkpoint), args.tokenizer and Path(args.tokenizer), params, mode=args.mode,
                               max_batch=args.max_batch, max_len=args.max_len, thinking=not args.no_thinking,
                               device=args.device, capture_routing=args.capture_routing,
                               capture_kept=args.capture_kept)
    from dsaforge.tracking import start_stage_run

    tracker = None if args.no_track else start_stage_run(cfg, "generate", parent_run_id=args.parent_run_id)
    try:
        summary = generate(policy, episodes, Path(args.out), rollout, tracker=tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.log_params({"backend": args.server or str(args.checkpoint), "mode": args.mode,
                            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                            "max_new_tokens": args.max_new_tokens, "thinking": not args.no_thinking,
                            "seed": args.seed})
        tracker.finish("FINISHED")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_tracking(args) -> int:
    from dsaforge.tracking import replay, resolve_tracking_uri

    cfg = _load(args)
    uri = args.tracking_uri or resolve_tracking_uri(cfg)
    for spool in args.spools:
        if not Path(spool).is_file():
            raise _UsageError(f"no spool file {spool}")
        n = replay(spool, uri)
        print(f"replayed {n} tracking call(s) of run {Path(spool).stem} into {uri}")
    return 0


def cmd_ui(args) -> int:
    from dsaforge.console import Settings, serve

    token = os.environ.get("DSAFORGE_CONSOLE_TOKEN") or None
    if args.token_file:
        path = Path(args.token_file)
        if not path.is_file():
            raise _UsageError(f"--token-file {path}: no such file")
        token = path.read_text().strip() or None
        if token is None:
            raise _UsageError(f"--token-file {path}: the file is empty")
    if args.max_parallel < 1:
        raise _UsageError("--max-parallel must be at least 1")
    serve(Settings(home=Path(args.home), host=args.host, port=args.port, token=token, tracking_uri=args.tracking_uri,
                   mlflow_url=args.mlflow_url, max_parallel=args.max_parallel, kfp_host=args.kfp_host))
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
    p.add_argument("--input", action="append", default=[], metavar="STAGE=PATH",
                   help="start from a finished stage's output instead of running it (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="re-run a failed run's failed step and those after it, reusing what finished "
                        "(RUN: its run id prefix or run record folder; config: the run's own plus --set)")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="compile a pipeline from the config and start it on a Kubeflow Pipelines cluster")
    p.add_argument("pipeline", help="pipeline name (see `dsaforge pipelines list`)")
    p.add_argument("--host", default=None, help="KFP API URL (default $KFP_HOST, else pipeline.host); credentials "
                   "from $KFP_TOKEN, $KFP_TOKEN_FILE or $KFP_COOKIE")
    p.add_argument("--experiment", default=None, help="KFP experiment (default pipeline.kfp_experiment)")
    p.add_argument("--run-name", default=None)
    p.add_argument("--namespace", default=None, help="profile namespace on multi-user installations")
    p.add_argument("--input", action="append", default=[], metavar="STAGE=URI",
                   help="start from a finished stage's output (s3://, gs://, minio://) instead of running it")
    _config_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("runs", help="list, inspect or cancel runs on a Kubeflow Pipelines cluster")
    p.add_argument("action", choices=["list", "get", "cancel"])
    p.add_argument("run_id", nargs="?", help="for get/cancel: the KFP run id")
    p.add_argument("--host", default=None, help="KFP API URL (default $KFP_HOST)")
    p.add_argument("--experiment", default=None, help="for list: only this KFP experiment")
    p.add_argument("--namespace", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stage", help="run one stage in-process (no KFP), for debugging")
    p.add_argument("name", help="stage name, e.g. prepare-data")
    p.add_argument("--out", required=True,
                   help="output directory of the stage: new or empty (a training stage resumes its own unfinished one)")
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
    p.add_argument("--input", action="append", default=[], metavar="STAGE=URI",
                   help="an earlier stage's output (object-store URI) that a sub-pipeline starts from (repeatable)")
    _config_args(p)
    p.set_defaults(func=cmd_pipelines)

    p = sub.add_parser("tracking", help="log what a stage kept on disk while its tracking server was away")
    p.add_argument("action", choices=["replay"])
    p.add_argument("spools", nargs="+", metavar="SPOOL", help="spool files (PIPELINE_HOME/spool/RUN_ID.jsonl)")
    p.add_argument("--tracking-uri", default=None, help="default: the configured store")
    _config_args(p)
    p.set_defaults(func=cmd_tracking)

    p = sub.add_parser("plan", help="memory plan: per-GPU memory and communication of each parallel layout")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GiB", help="memory per GPU, e.g. 141 (H200)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the stage's train.<stage>.seq_len")
    p.add_argument("--stage", choices=["pretrain", "warmup", "sparse"], default="sparse")
    _config_args(p)
    p.set_defaults(func=cmd_plan)

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
    p = sub.add_parser("generate", help="complete prompts or roll out agent tasks into Parquet")
    src = p.add_argument_group("what to generate")
    src.add_argument("--prompts", default=None, help=".jsonl/.parquet with 'prompt' or 'messages' (and 'id')")
    src.add_argument("--tasks", default=None, help="a synthesize output directory: roll out its agent tasks")
    src.add_argument("--split", default=None, help="with --tasks: train or heldout")
    src.add_argument("--limit", type=int, default=None, help="at most this many prompts/tasks")
    be = p.add_argument_group("backend")
    be.add_argument("--checkpoint", default=None, help="a training stage's output (or HF) directory")
    be.add_argument("--tokenizer", default=None, help="tokenizer.json or the prepare-data output directory")
    be.add_argument("--server", default=None, help="OpenAI-compatible base URL instead of --checkpoint (no routing "
                                                   "or kept-set capture)")
    be.add_argument("--model", default=None, help="model name at --server (default: the first one listed)")
    be.add_argument("--mode", choices=["sparse", "dense"], default="sparse")
    be.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    be.add_argument("--max-batch", type=int, default=64)
    be.add_argument("--max-len", type=int, default=None, help="context window (default: the model's max_seq_len)")
    be.add_argument("--capture-routing", action="store_true", help="record MoE routing per token (Keep Routing)")
    be.add_argument("--capture-kept", action="store_true", help="record kept-token sets (Keep Sampling Mask)")
    sp = p.add_argument_group("sampling and turns")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--max-new-tokens", type=int, default=1024, help="per assistant segment")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (--checkpoint): each episode samples from "
                    "(seed, its index), so the same seed and inputs repeat a run whatever --max-batch")
    sp.add_argument("--no-thinking", action="store_true", help="non-thinking mode (no <think> reasoning)")
    sp.add_argument("--max-turns", type=int, default=20)
    sp.add_argument("--context", default="discard_all", choices=["discard_all", "discard_75", "reprefill", "none"])
    sp.add_argument("--context-budget", type=float, default=0.8)
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--parent-run-id", default=None, help="attach to this MLflow run as a child")
    _config_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("ui", help="the web console: submit pipelines, follow runs, compare them in MLflow")
    p.add_argument("--host", default="127.0.0.1", help="bind address; beyond 127.0.0.1 a token is required")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", default=None, help="file holding the access token (default: "
                   "$DSAFORGE_CONSOLE_TOKEN; generated and printed when bound beyond 127.0.0.1)")
    p.add_argument("--home", default=".dsaforge", help="the console's queue, run folders and default MLflow store")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else SQLite "
                   "under --home)")
    p.add_argument("--mlflow-url", default=None, help="MLflow UI for links (default: the tracking server, else "
                   "http://127.0.0.1:5000 as `dsaforge mlflow ui` serves it)")
    p.add_argument("--max-parallel", type=int, default=1, help="local runs at once (default 1)")
    p.add_argument("--kfp-host", default=None, help="Kubeflow Pipelines API URL: also submit to that cluster")
    p.set_defaults(func=cmd_ui)
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

        from dsaforge.synth.llm import LLMError

        bad_input = isinstance(e, (ConfigError, DataError, FileNotFoundError, _UsageError, LLMError))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dsaforge: error: {msg}" + ("" if bad_input else f" ({type(e).__name__}; --debug for the traceback)"),
              file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
