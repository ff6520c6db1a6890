"""Run: python -m pytest tests/core/test_cli.py -q"""
import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import free_port, stop, wait_http


def dsaforge(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "dsaforge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("cmd", [[], ["run"], ["stage"], ["config"], ["pipelines"], ["mlflow"], ["submit"], ["runs"]])
def test_help_on_every_command(cmd):
    out = dsaforge(*cmd, "--help").stdout
    assert out.startswith("usage: dsaforge" + "".join(f" {c}" for c in cmd))
    assert ("--debug" in out) == (not cmd)


def test_config_show_schema_diff(tmp_path):
    shown = yaml.safe_load(dsaforge("config", "show", "--preset", "small", "--set", "model.n_layers=3").stdout)
    assert shown["preset"] == "small" and shown["model"]["n_layers"] == 3
    as_json = json.loads(dsaforge("config", "show", "--format", "json").stdout)
    assert as_json["preset"] == "tiny"
    dsaforge("config", "schema", "--out", str(tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["title"] == "Config"
    f = tmp_path / "mine.yaml"
    f.write_text("preset: tiny\nmodel:\n  dim: 96\n")
    assert dsaforge("config", "diff", "tiny", str(f)).stdout.strip() == "model.dim  64 -> 96"


@pytest.mark.parametrize("args, message", [
    (["config", "show", "--preset", "huge"], "dsaforge: error: unknown preset 'huge'; available: tiny, small, h200, v32, base"),
    (["config", "show", "--set", "model.dimm=3"], "dsaforge: error: --set model.dimm: unknown key 'dimm'"),
    (["config", "show", "--set", "model.dim=big"], "dsaforge: error: config: model.dim: Input should be a valid integer"),
    (["config", "show", "--config", "/nonexistent.yaml"], "dsaforge: error: config file not found: /nonexistent.yaml"),
    (["run", "no-such-pipeline"], "dsaforge: error: unknown pipeline 'no-such-pipeline'; available: end-to-end"),
    (["stage", "no-such-stage", "--out", "x"], "dsaforge: error: unknown stage 'no-such-stage'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = dsaforge(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_debug_shows_traceback():
    proc = dsaforge("--debug", "config", "show", "--preset", "huge", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_pipelines_list_and_compile(tmp_path):
    assert "end-to-end" in dsaforge("pipelines", "list").stdout
    out = dsaforge("pipelines", "compile", "--preset", "small", "--out", str(tmp_path)).stdout
    # a sub-pipeline that starts from earlier outputs is compiled only when given them
    assert "skipped post-training: it starts from earlier outputs" in out and "--input sparse=URI" in out
    dsaforge("pipelines", "compile", "post-training", "--preset", "small", "--out", str(tmp_path),
             "--input", "prepare-data=s3://b/data", "--input", "sparse=s3://b/sparse")
    assert (tmp_path / "post-training.yaml").is_file()
    missing = dsaforge("pipelines", "compile", "post-training", "--out", str(tmp_path), check=False)
    assert missing.returncode == 2 and "needs the output of prepare-data, sparse" in missing.stderr
    ir, platform = yaml.safe_load_all((tmp_path / "end-to-end.yaml").read_text())
    assert ir["pipelineInfo"]["name"] == "end-to-end" and ir["schemaVersion"] == "2.1.0"
    executors = ir["deploymentSpec"]["executors"]
    assert {"exec-prepare-data", "exec-pretrain", "exec-warmup", "exec-sparse", "exec-synthesize"} <= set(executors)
    assert json.loads(ir["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])["preset"] == "small"
    # the small preset's training stages get one GPU each, tolerate the GPU taint and mount a memory /dev/shm
    gpu = executors["exec-sparse"]["container"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu" and int(gpu["resourceCount"]) == 1
    assert "accelerator" not in executors["exec-prepare-data"]["container"]["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sparse"]
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu" and k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"


def test_stage_in_process(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    proc = dsaforge("stage", "prepare-data", "--out", str(tmp_path / "ds"), "--no-track",
                    "--set", f"data.sources=[{src}]", "--set", "data.seq_len=16", "--set", "data.val_fraction=0.0")
    summary = json.loads(proc.stdout)
    assert summary["documents"] == 1 and summary["train_sequences"] > 10
    assert (tmp_path / "ds" / "manifest.json").exists()
    again = dsaforge("stage", "prepare-data", "--out", str(tmp_path / "ds"), "--no-track",
                     "--set", f"data.sources=[{src}]", check=False)
    assert again.returncode == 2 and "output directory is not empty" in again.stderr


def test_unreachable_tracking_server_is_one_line(tmp_path):
    proc = dsaforge("run", "end-to-end", "--set", "tracking.uri=http://127.0.0.1:9", "--set",
                    f"pipeline.home={tmp_path}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("dsaforge: error: MLflow server at http://127.0.0.1:9 is unreachable")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mlflow_ui_serves_the_local_store(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsaforge", "mlflow", "ui", "--port", str(port), "--set",
                             f"pipeline.home={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        wait_http(f"http://127.0.0.1:{port}/health")
    finally:
        stop(proc)
