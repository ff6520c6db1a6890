"""Sparse MLA forward/backward/decode through Triton's interpreter against the float64 reference."""
import importlib

import pytest
import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import last_path, sparse_mla, sparse_mla_bwd, sparse_mla_decode, sparse_mla_fwd
from dsaforge.kernels._dispatch import KernelInputError, poison_outputs


def _inputs(b=2, s=5, t=40, h=3, d_v=32, d_pe=8, k=16):
    q = torch.randn(b, s, h, d_v + d_pe)
    kv = torch.randn(b, t, d_v + d_pe)
    idx = torch.stack([torch.stack([torch.randperm(t)[:k] for _ in range(s)]) for _ in range(b)]).int()
    idx[0, 0, 5:] = -1                     # a row with few keys
    idx[-1, -1, :] = -1                    # a row with none
    return q, kv, idx


def test_forward_matches_reference(interpret, report):
    q, kv, idx = _inputs()
    with poison_outputs():
        out, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32)
    assert last_path("sparse_mla_fwd")[0] == "triton"
    want_out, want_lse = ref.sparse_mla(q.double(), kv.double(), idx, 0.3, 32)
    assert report("out", out, want_out) < 1e-5
    assert report("lse", lse, want_lse) < 1e-5
    assert torch.isneginf(lse[1, -1]).all() and (out[1, -1] == 0).all()
    assert not out.isnan().any()


@pytest.mark.parametrize("h,chunk_rows", [(3, None), (3, 2), (20, 3)])
def test_forward_with_target_matches_reference(interpret, report, monkeypatch, h, chunk_rows):
    """target=True: the KL target's mass from the forward's own block probabilities (stored a chunk of rows at a
    time, rescaled to the final LSE by `_selected_mass_kernel`) equals the head-summed probabilities in float64,
    including slots that are empty, a row with no key at all, and blocks seen before a row's first valid key."""
    mod = importlib.import_module("dsaforge.kernels.sparse_mla")
    target = importlib.import_module("dsaforge.kernels.sparse_mla_target")
    monkeypatch.setitem(mod.FWD_CONFIG, 32, (16, 8, 4, 1))   # 3 key blocks of 8; 20 heads take 2 head blocks
    q, kv, idx = _inputs(h=h, k=24)
    idx[1, 1, :9] = -1                     # a first block with no valid key (running max still -inf)
    idx[0, 2, 3] = idx[0, 2, 20]           # a later block raises the running max (rescaling)
    q[0, 2] *= 4
    with poison_outputs():
        out, lse, mass = target.forward_with_target(q, kv, idx, 0.3, 32, chunk_rows=chunk_rows)
    assert last_path("sparse_mla_fwd")[0] == "triton"
    want_out, want_lse = ref.sparse_mla(q.double(), kv.double(), idx, 0.3, 32)
    want = ref.selected_mass(q.double(), kv.double(), want_lse, idx, 0.3)
    assert report("out", out, want_out) < 1e-5 and report("lse", lse, want_lse) < 1e-5
    assert report("mass", mass, want) < 1e-5
    assert (mass[idx < 0] == 0).all() and not mass.isnan().any()
    assert report("mass row sums = live heads", mass[0, 1:].sum(-1), torch.full((4,), float(h))) < 1e-4


def test_target_through_autograd_and_fallback(interpret, report, monkeypatch):
    """sparse_mla(..., target=True) returns the same mass with and without the kernels, and the mass carries no
    gradient while out/lse keep theirs."""
    q, kv, idx = _inputs()
    qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse, mass = sparse_mla(qq, kk, idx, 0.3, 32, target=True)
    assert not mass.requires_grad and out.requires_grad
    out.sum().backward()
    monkeypatch.setenv("DSAFORGE_KERNELS", "reference")
    _, _, want = sparse_mla(q, kv, idx, 0.3, 32, target=True)
    assert last_path("sparse_mla_fwd")[0] == "reference"
    assert report("mass vs reference path", mass, want) < 1e-5


@pytest.mark.parametrize("h,d_v,d_pe", [(16, 64, 64), (20, 32, 8)])
def test_forward_head_and_rope_padding(interpret, report, h, d_v, d_pe):
    q, kv, idx = _inputs(b=1, s=3, t=70, h=h, d_v=d_v, d_pe=d_pe, k=64)
    out, lse = sparse_mla_fwd(q, kv, idx, 0.1, d_v)
    want_out, want_lse = ref.sparse_mla(q.double(), kv.double(), idx, 0.1, d_v)
    assert report("out", out, want_out) < 1e-5
    assert report("lse", lse, want_lse) < 1e-5


def test_decode_split_k_matches_reference(interpret, report):
    q, kv, idx = _inputs(b=3, s=1, t=90, k=48)
    out, lse = sparse_mla_decode(q, kv, idx, 0.3, 32, num_splits=3)
    want_out, want_lse = ref.sparse_mla(q.double(), kv.double(), idx, 0.3, 32)
    assert report("decode out", out, want_out) < 1e-5
    assert report("decode lse", lse, want_lse) < 1e-5


@pytest.mark.parametrize("algorithm,deterministic", [("split", False), ("split", True), ("fused", False)])
def test_backward_matches_autograd_reference(interpret, report, algorithm, deterministic):
    q, kv, idx = _inputs()
    out, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32)
    # dO as an einsum's gradient arrives: a head-major buffer seen token-major (strided, unit last stride)
    dout = torch.randn(out.shape[2], *out.shape[:2], out.shape[3]).permute(1, 2, 0, 3)
    dlse = torch.randn_like(lse)
    with poison_outputs():
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.3, 32, dlse=dlse, deterministic=deterministic,
                                 algorithm=algorithm, chunk_rows=3)
    assert last_path("sparse_mla_bwd")[0] == "triton"
    qq, kk = q.double().requires_grad_(), kv.double().requires_grad_()
    o, l = ref.sparse_mla(qq, kk, idx, 0.3, 32)
    torch.autograd.backward([o, l], [dout.double(), dlse.double().masked_fill(torch.isneginf(l), 0)])
    assert report("dq", dq, qq.grad) < 1e-5
    assert report("dkv", dkv, kk.grad) < 1e-5


def test_scratch_is_bounded_whatever_the_batch(interpret, report, monkeypatch):
    """The split backward's dS and P and the target's stored P are sized over the whole batch: more sequences of the
    same tokens take fewer rows per chunk, not more memory (16 x 4K once held 16x the scratch of 1 x 64K)."""
    mod = importlib.import_module("dsaforge.kernels.sparse_mla_bwd")
    target = importlib.import_module("dsaforge.kernels.sparse_mla_target")
    q, kv, idx = _inputs(b=4, s=6, h=3, k=16)
    per_seq_row = 2 * 3 * 16 * q.element_size()
    monkeypatch.setattr(mod, "BWD_SCRATCH_BYTES", 2 * 4 * per_seq_row)          # two rows of all four sequences
    monkeypatch.setattr(target, "TARGET_SCRATCH_BYTES", 2 * 4 * per_seq_row)
    shapes = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: shapes.append(tuple(a)) or real_empty(*a, **k))
    out, lse, mass = target.forward_with_target(q, kv, idx, 0.3, 32)
    dout = torch.randn_like(out)
    dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.3, 32, algorithm="split")
    monkeypatch.setattr(torch, "empty", real_empty)
    scratch = [sh for sh in shapes if len(sh) == 4 and sh[2:] == (3, 16)]          # [B, rows, H, K] buffers
    assert len(scratch) == 3 and all(sh[0] == 4 and sh[0] * sh[1] * per_seq_row <= 2 * 4 * per_seq_row * 2
                                     for sh in scratch), scratch                  # P (forward); dS and P (backward)
    assert scratch[1][1] == scratch[2][1] == 2, scratch                            # two rows of every sequence
    qq, kk = q.double().requires_grad_(), kv.double().requires_grad_()
    o, l = ref.sparse_mla(qq, kk, idx, 0.3, 32)
    torch.autograd.backward([o], [dout.double()])
    assert report("mass", mass, ref.selected_mass(q.double(), kv.double(), l, idx, 0.3)) < 1e-5
    assert report("dq", dq, qq.grad) < 1e-5 and report("dkv", dkv, kk.grad) < 1e-5


def test_deterministic_backward_is_bitwise_reproducible(interpret, report):
    q, kv, idx = _inputs()
    out, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32)
    dout = torch.randn_like(out)
    a = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.3, 32, deterministic=True, chunk_rows=2)
    b = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.3, 32, deterministic=True)
    assert torch.equal(a[1], b[1]) or report("chunked vs whole", a[1], b[1]) < 1e-6
    c = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.3, 32, deterministic=True, chunk_rows=2)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_autograd_function(interpret, report):
    q, kv, idx = _inputs()
    q.requires_grad_()
    kv.requires_grad_()
    out, _ = sparse_mla(q, kv, idx, 0.3, 32)
    out.square().sum().backward()
    qq, kk = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    ref.sparse_mla(qq, kk, idx, 0.3, 32)[0].square().sum().backward()
    assert report("dq", q.grad, qq.grad) < 1e-4
    assert report("dkv", kv.grad, kk.grad) < 1e-4


def test_cpu_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("DSAFORGE_KERNELS", raising=False)
    q, kv, idx = _inputs()
    out, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32)
    path, why = last_path("sparse_mla_fwd")
    assert path == "reference" and "CPU" in why
    want_out, _ = ref.sparse_mla(q, kv, idx, 0.3, 32)
    assert torch.equal(out, want_out)


def test_unsupported_shape_falls_back(interpret, report):
    q, kv, idx = _inputs(d_v=24, d_pe=8)
    sparse_mla_fwd(q, kv, idx, 0.3, 24)
    assert last_path("sparse_mla_fwd") == ("reference", "d_v=24 is not a power of two >= 16")


@pytest.mark.parametrize("mutate,msg", [
    (lambda q, kv, idx: (q[..., 0], kv, idx), "q must have 4 dims"),
    (lambda q, kv, idx: (q, kv[:, :, :-1], idx), "kv must be"),
    (lambda q, kv, idx: (q, kv, idx.float()), "indices dtype"),
    (lambda q, kv, idx: (q, kv.double(), idx), "kv dtype"),
    (lambda q, kv, idx: (q.transpose(2, 3).contiguous().transpose(2, 3), kv, idx), "contiguous in its last dim"),
    (lambda q, kv, idx: (q, kv, idx[:, :2]), "indices must be"),
])
def test_validation_errors(mutate, msg):
    q, kv, idx = _inputs()
    with pytest.raises(KernelInputError, match=msg):
        sparse_mla_fwd(*mutate(q, kv, idx), 0.3, 32)


@pytest.mark.parametrize("algorithm", ["split", "fused"])
def test_backward_many_heads(interpret, report, algorithm):
    q, kv, idx = _inputs(b=1, s=2, t=50, h=80, d_v=64, d_pe=64, k=32)
    out, lse = sparse_mla_fwd(q, kv, idx, 0.1, 64)
    dout = torch.randn_like(out)
    dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, 0.1, 64, algorithm=algorithm)
    qq, kk = q.double().requires_grad_(), kv.double().requires_grad_()
    ref.sparse_mla(qq, kk, idx, 0.1, 64)[0].backward(dout.double())
    assert report("dq", dq, qq.grad) < 1e-5
    assert report("dkv", dkv, kk.grad) < 1e-5


@pytest.mark.parametrize("bad", [7, 8, 1000, -2])
def test_out_of_range_index_is_refused(interpret, bad):
    """An index past the last key (or below -1) would make the kernel read outside kv; the wrapper refuses it
    while DSAFORGE_CHECK_INDICES=1 (the test suite's setting)."""
    from dsaforge.kernels import sparse_mla_fwd
    from dsaforge.kernels._dispatch import KernelInputError

    q, kv = torch.randn(1, 4, 2, 32 + 16), torch.randn(1, 7, 32 + 16)
    idx = torch.tensor([[[0, 1, -1, -1], [0, 1, 2, -1], [1, 2, 3, bad], [0, 2, 4, 6]]], dtype=torch.int32)
    with pytest.raises(KernelInputError, match=f"indices holds {bad}, outside \\[-1, 7\\)"):
        sparse_mla_fwd(q, kv, idx, 0.1, 32)


@pytest.mark.gpu
def test_out_of_range_index_is_refused_on_the_gpu():
    """The same check in front of the fused kernels (Triton and the Hopper kernel), which would read past kv."""
    from dsaforge.kernels import sparse_mla_fwd
    from dsaforge.kernels._dispatch import KernelInputError

    q = torch.randn(1, 64, 16, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 64, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(64, device="cuda", dtype=torch.int32).repeat(1, 64, 1)
    idx[0, 5, 7] = 64
    with pytest.raises(KernelInputError, match="indices holds 64, outside \\[-1, 64\\)"):
        sparse_mla_fwd(q, kv, idx, 576 ** -0.5, 512)
