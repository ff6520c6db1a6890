"""The chunked LM loss (`Transformer.lm_loss_chunked` on `forward(..., return_hidden=True)`) against the plain
cross-entropy over full logits: values, gradients of every parameter, ignored targets, and the memory claim
(nothing of the size of the logits kept for backward)."""
import pytest
import torch
import torch.nn.functional as F

from tests.model.model_helpers import make_model, rand_tokens


def _targets(tokens, ignore_every=5):
    t = tokens.roll(-1, dims=1).clone()
    t[:, ::ignore_every] = -100                       # unscored positions (document boundaries, padding)
    return t


@pytest.mark.parametrize("chunk", [7, 16, 4096])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_chunked_loss_equals_full_logits_loss(chunk, mode):
    model = make_model().train()
    tokens = rand_tokens(2, 20)
    targets = _targets(tokens)

    out = model(tokens, mode=mode)
    ref = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)

    hid = model(tokens, mode=mode, return_hidden=True)
    assert hid.logits is None and hid.hidden.shape == (2, 20, model.cfg.dim)
    loss = model.lm_loss_chunked(hid.hidden, targets, chunk=chunk)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    print(f"\nloss {ref.item():.6f} vs {loss.item():.6f}")
    assert abs(loss.item() - ref.item()) <= 1e-6
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max() <= 1e-6 * max(1.0, float(b.abs().max())), name


def test_hidden_is_what_the_head_reads():
    model = make_model()
    tokens = rand_tokens(1, 12)
    out, hid = model(tokens), model(tokens, return_hidden=True)
    assert out.hidden is None
    assert torch.equal(model.head(hid.hidden), out.logits)


def test_chunked_loss_keeps_no_logits_for_backward():
    """What autograd keeps until backward passes through saved-tensor hooks: the plain loss keeps [N, vocab]
    log-probabilities; the chunked loss keeps nothing of that size (a checkpointed chunk's own saves go to the
    checkpoint, which drops them and recomputes the chunk in backward)."""
    model = make_model().train()
    tokens = rand_tokens(1, 64)
    targets = _targets(tokens)
    vocab, chunk = model.cfg.vocab_size, 16

    def largest_saved(fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    def plain():
        logits = model(tokens).logits
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def chunked():
        model.lm_loss_chunked(model(tokens, return_hidden=True).hidden, targets, chunk=chunk)

    assert largest_saved(plain) >= 64 * vocab
    assert largest_saved(chunked) < chunk * vocab


def test_chunked_loss_without_grad_matches():
    model = make_model()
    tokens = rand_tokens(2, 20)
    targets = _targets(tokens, ignore_every=3)
    with torch.no_grad():
        ref = F.cross_entropy(model(tokens).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        got = model.lm_loss_chunked(model(tokens, return_hidden=True).hidden, targets, chunk=9)
    assert abs(got.item() - ref.item()) <= 1e-6
