"""`dsaforge generate`: a checkpoint and a prompt file in, Parquet out; bad input exits 2 with one line."""
import json

import pyarrow.parquet as pq
import pytest

from dsaforge.cli import main
from dsaforge.data.tokenizer import train_tokenizer
from dsaforge.model.hf import export_hf
from dsaforge.rollout.generate import SCHEMA
from tests.model.model_helpers import make_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = make_model(seed=2, index_topk=8)
    export_hf(model, d / "hf")
    train_tokenizer(["hello world, the quick brown fox"] * 20, vocab_size=400).save(str(d / "tokenizer.json"))
    return d, model


def test_generate_writes_parquet(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    d, model = ckpt
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "hello"}, {"prompt": "the quick brown fox"},
        {"id": "c", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "world"}]}]))
    out = tmp_path / "gen.parquet"
    rc = main(["generate", "--checkpoint", str(d), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
               "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--capture-routing",
               "--max-batch", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    t = pq.read_table(out)
    assert t.schema.equals(SCHEMA) and t.num_rows == 3 == summary["conversations"]
    rows = t.to_pylist()
    assert [r["id"] for r in rows] == ["a", "1", "c"]
    for r in rows:
        n = len(r["tokens"])
        assert len(r["mask"]) == len(r["logprobs"]) == n and 1 <= sum(r["mask"]) <= 6
        assert r["finish_reason"] in ("answered", "length") and r["passed"] is None
        assert len(r["routing"]) == n - 1 and len(r["routing"][0]) == model.n_moe_layers
        assert all(lp <= 0 for lp, m in zip(r["logprobs"], r["mask"]) if m)
    assert summary["generated_tokens"] == sum(sum(r["mask"]) for r in rows)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["dsaforge.stage"] == "generate" and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) == 3
    assert run.data.params["temperature"] == "0.8"


@pytest.mark.parametrize("argv, why", [
    (["--checkpoint", "/nonexistent", "--prompts", "PROMPTS"], "no checkpoint"),
    (["--checkpoint", "CKPT", "--prompts", "/nonexistent.jsonl"], "prompt file not found"),
    (["--checkpoint", "CKPT", "--prompts", "BAD"], "not a readable"),
    (["--checkpoint", "CKPT", "--prompts", "NOPROMPT"], "needs a 'prompt'"),
    (["--server", "http://127.0.0.1:9/v1", "--prompts", "PROMPTS"], "127.0.0.1:9"),
    (["--checkpoint", "CKPT", "--prompts", "PROMPTS", "--tasks", "X"], "exactly one of"),
    (["--checkpoint", "CKPT", "--prompts", "PROMPTS", "--top-p", "0"], "top_p"),
])
def test_bad_input_exits_2(ckpt, tmp_path, capsys, argv, why):
    files = {"PROMPTS": tmp_path / "p.jsonl", "BAD": tmp_path / "bad.jsonl", "NOPROMPT": tmp_path / "np.jsonl"}
    files["PROMPTS"].write_text('{"prompt": "hi"}\n')
    files["BAD"].write_text("{not json\n")
    files["NOPROMPT"].write_text('{"text": "hi"}\n')
    argv = [str(files[a]) if a in files else str(ckpt[0]) if a == "CKPT" else a for a in argv]
    out = tmp_path / "o.parquet"
    assert main(["generate", *argv, "--out", str(out), "--device", "cpu", "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and not out.exists()
