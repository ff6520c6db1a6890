"""After a GRPO update, the rollout engine samples from exactly the weights the trainer updated and the stage
exports: the engine's log-probs (after `refresh_weights`) equal a full forward of the trained model, and the HF
export loads back to the same weights. A stale engine (no refresh) or a lossy export fails it.

Run: python -m pytest tests/rl/test_sync.py -q     (about 15 s on CPU)
"""
import copy

import torch

from dsaforge.model.engine import Engine
from dsaforge.model.infer import stack
from dsaforge.model.moe import MoE
from dsaforge.model.hf import import_hf
from dsaforge.model.rl.grpo import LossConfig, grpo_loss
from dsaforge.model.rl.policy import token_logprobs
from dsaforge.model.sampling import SamplingParams

from .test_stabilisers import _batch, _episodes, _setup


def _greedy(engine, prompt, n):
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=n))[0]
    return prompt + out.tokens, torch.tensor(out.logprobs)


@torch.no_grad()
def _full(model, tokens, n):
    logits = model(torch.tensor([tokens[:-1]]), mode="sparse").logits
    logp = torch.log_softmax(logits.float(), -1)[0]
    return logp.gather(-1, torch.tensor(tokens[1:])[:, None])[-n:, 0]


def _fail(what, value):
    raise AssertionError(f"non-finite {what}: {value}")


def test_engine_and_export_follow_the_trained_weights(tmp_path):
    cfg, state = _setup()
    model, prompt, n = state.model, list(range(5, 20)), 10
    engine = Engine(model, mode="sparse", max_batch=4, max_len=64, capture_routing=True, capture_kept=True, seed=0)
    # the GPU's derived weights (experts stacked for the sync-free MoE paths), here on CPU: a copy that only
    # refresh_weights() renews
    engine.stacked = [stack(b.ffn) if isinstance(b.ffn, MoE) else None for b in model.layers]
    model.eval()
    tokens, before = _greedy(engine, prompt, n)
    assert (before - _full(model, tokens, n)).abs().max() < 1e-5

    old = copy.deepcopy(model)
    eps = _episodes(cfg, model, top_p=1.0)
    b = _batch(cfg, eps)
    model.train()
    state.optimizer.zero_grad(set_to_none=True)
    logp, _, mask = token_logprobs(model, b.tokens, b.sampled, "sparse", b.routing, b.keep, 1.0, b.lengths)
    loss, _ = grpo_loss(logp, b.old_logp, b.advantages, mask, LossConfig(), None, b.kl_coef,
                        n_seqs=len(eps), n_tokens=int(mask.sum()))
    loss.backward()
    state.optimizer_step(1e-2, _fail)
    model.eval()
    engine.refresh_weights()

    tokens, after = _greedy(engine, prompt, n)
    trained = _full(model, tokens, n)
    assert (trained - _full(old, tokens, n)).abs().max() > 1e-2         # the update moved the policy
    assert (after - trained).abs().max() < 1e-5                         # the engine samples the updated policy
    state.export(tmp_path / "hf", {})
    exported = import_hf(tmp_path / "hf").eval()
    # the export is the trained policy, bit for bit; its forward may differ in the last bit only, as the loaded
    # weights sit at other memory alignments than the trained ones, which the CPU's matmul kernels notice
    for name, t in model.state_dict().items():
        assert torch.equal(t.float(), exported.state_dict()[name].float()), name
    assert (_full(exported, tokens, n) - trained).abs().max() < 1e-6
