"""The rollout engine on a GPU: bf16, Triton kernels, CUDA-graph decode. Run with `make gpu-test` on one GPU."""
import pytest
import torch

from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams
from tests.model.model_helpers import make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_graph_decode_equals_eager_and_a_full_forward(mode):
    model = make_model(seed=2, index_topk=8, index_n_heads=16).cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 40, 17, 90)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    graphs = Engine(model, mode=mode, max_batch=3, max_len=160, cuda_graphs=True)
    eager = Engine(model, mode=mode, max_batch=3, max_len=160, cuda_graphs=False)
    a, b = graphs.generate(prompts, greedy), eager.generate(prompts, greedy)
    assert graphs.stats["cuda_graphs"] == "on", graphs.stats["cuda_graphs"]
    for x, y, p in zip(a, b, prompts):
        # bf16: compare log-probs where the two runs agree on the tokens
        n = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), len(x.tokens))
        assert n >= 8, (len(p), x.tokens, y.tokens)
        torch.testing.assert_close(torch.tensor(x.logprobs[:n]), torch.tensor(y.logprobs[:n]), atol=0.05, rtol=0)
        with torch.no_grad():
            full = model(torch.tensor([p + x.tokens], device="cuda"), mode=mode).logits[0].float().log_softmax(-1)
        want = full[torch.arange(len(p) - 1, len(p) + len(x.tokens) - 1), torch.tensor(x.tokens, device="cuda")]
        print(f"{mode} len {len(p)}: max |dlogp| vs full forward {(want.cpu() - torch.tensor(x.logprobs)).abs().max():.3f}")
        torch.testing.assert_close(torch.tensor(x.logprobs), want.cpu(), atol=0.1, rtol=0)
