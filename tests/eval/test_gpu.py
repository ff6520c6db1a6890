"""GPU checks of the evaluation (run on the H200 with `make gpu-test` or `pytest -m gpu tests/eval`): the efficiency
suite at DeepSeek-V3.2's attention shape, and the suites' scoring on CUDA against the CPU."""
import math

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_efficiency_suite_at_v32_attention_shape():
    from dsaforge.config import load_config
    from dsaforge.eval import efficiency
    from dsaforge.model import Transformer

    cfg = load_config("v32", (), ["model.n_layers=2", "model.n_dense_layers=2", "model.n_mtp_layers=0",
                                  "eval.efficiency.positions=[4096, 16384]", "eval.efficiency.repeats=2",
                                  "eval.efficiency.decode_batch=8"])
    with torch.device("cuda"):
        model = Transformer(cfg.model).to(torch.bfloat16).eval()
    result = efficiency.run(model, cfg)
    assert len(result.rows) == 2 * 2 * 2
    assert all(math.isfinite(r["usd_per_mtok"]) and r["seconds"] > 0 for r in result.rows)
    assert result.info["n_heads"] == 128 and result.info["top_k"] == 2048


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scores_on_cuda_match_cpu(eval_data, eval_stage_dir):
    from dsaforge.eval.checkpoint import EvalModel

    cpu = EvalModel.load(eval_stage_dir / "hf", eval_data / "tokenizer.json", torch.device("cpu"))
    gpu = EvalModel.load(eval_stage_dir / "hf", eval_data / "tokenizer.json", torch.device("cuda"))
    prefix, cont = [cpu.bos] + cpu.encode("def main():\n    print("), cpu.encode("'hello')")
    for mode in ("dense", "sparse"):
        a, b = cpu.score([prefix], [cont], mode)[0], gpu.score([prefix], [cont], mode)[0]
        assert a.logprob == pytest.approx(b.logprob, rel=0.05, abs=0.5)     # bf16 on the GPU
