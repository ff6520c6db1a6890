"""Sharded initialisation and sharded HF import, rank by rank in one process (torch's fake process group): under
TP2, EP2, PP2 and TP2xEP2xPP2 each rank's tensors equal the matching slices of the unsharded model (same seed) and
of the full `import_hf` (an FP8 block-scaled checkpoint whose TP slices cut through 128x128 scale blocks), the
ranks' pieces cover every element, and a rank reads only its own slices' bytes.

Run: python -m pytest tests/train/test_shards.py -q
"""
import json
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dsaforge.config import load_config
from dsaforge.model.hf import export_hf, import_hf
from dsaforge.model.train.hf_shards import HFShards
from dsaforge.model.train.shards import Piece, build_sharded, init_region, init_rules, shard_view
from tests.model.model_helpers import quantize_fp8_blocks
from dsaforge.model.transformer import Transformer

fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
LAYOUTS = {"tp2": (2, 1, 1, 2), "ep2": (1, 2, 1, 2), "pp2": (1, 1, 2, 2), "tp2.ep2.pp2": (2, 2, 2, 8)}


def _cfg(layout="tp1", **model):
    tp, ep, pp, world = LAYOUTS.get(layout, (1, 1, 1, 1))
    sets = [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.pp={pp}", f"parallel.nproc_per_node={world}"]
    return load_config("tiny", overrides=sets + [f"model.{k}={v}" for k, v in model.items()])


@contextmanager
def _rank(cfg, rank):
    from dsaforge.model import megatron_bridge as bridge
    world = cfg.parallel.nproc_per_node
    dist.init_process_group("fake", rank=rank, world_size=world, store=fake_pg.FakeStore())
    par = None
    try:
        par = bridge.init_parallel(cfg, torch.device("cpu"))
        yield par, bridge
    finally:
        if par is not None:
            bridge.destroy(par)
        elif dist.is_initialized():
            dist.destroy_process_group()


def _per_rank(layout, init_from=None, **model):
    """[(view, local tensors, bytes read)] of every rank of `layout`."""
    cfg = _cfg(layout, **model)
    out = []
    for rank in range(cfg.parallel.nproc_per_node):
        with _rank(cfg, rank) as (par, bridge):
            m = build_sharded(cfg, par, bridge, torch.device("cpu"), init_from)
            view = shard_view(m, par)
            out.append((view, {k: v.detach().clone() for k, v in m.state_dict().items() if k in view}))
    return out


def _assert_slices(full: dict, ranks: list, layout: str):
    covered = {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in full.items()}
    total = sum(v.numel() for v in full.values())
    for view, tensors in ranks:
        for local, t in tensors.items():
            piece = view[local]
            assert piece.shape == tuple(full[piece.name].shape), (layout, local)
            assert torch.equal(t, full[piece.name][piece.region]), (layout, local, piece)
            covered[piece.name][piece.region] += 1
        held = sum(t.numel() for t in tensors.values())
        assert held < total, f"{layout}: a rank holds the whole model"
    assert all(bool((c > 0).all()) for c in covered.values()), f"{layout}: some elements belong to no rank"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_equals_the_unsharded_model(layout):
    full = build_sharded(_cfg()).state_dict()
    _assert_slices(full, _per_rank(layout), layout)


def test_init_follows_the_models_own_initialisation_and_the_seed():
    cfg = _cfg()
    torch.manual_seed(0)
    reference = Transformer(cfg.model)              # torch's RNG, module by module (Transformer._init_weights)
    ours = build_sharded(cfg).state_dict()
    other = build_sharded(cfg, seed=cfg.train.seed + 1).state_dict()
    for name, ref in reference.state_dict().items():
        if ref.std() == 0:                           # norms (ones), biases (zeros)
            assert torch.equal(ours[name], ref), name
        else:
            assert abs(ours[name].std() / ref.std() - 1) < 0.25 and abs(ours[name].mean()) < 2e-3, name
            assert not torch.equal(ours[name], other[name]), name
    # a piece draws only the tiles it overlaps, and the same numbers as the whole tensor
    whole = Piece("w", (600, 520), (slice(0, 600), slice(0, 520)))
    part = Piece("w", (600, 520), (slice(130, 390), slice(250, 520)))
    assert torch.equal(init_region(7, whole, ("normal", 1.0))[part.region], init_region(7, part, ("normal", 1.0)))
    with torch.device("meta"):
        assert set(init_rules(Transformer(cfg.model))) == set(reference.state_dict())


# dim 256 and experts of 160 rows: TP2's slices (80 rows of w1, 128 columns of w2) cut through 128-blocks
FP8_MODEL = dict(dim=256, moe_inter_dim=160, inter_dim=192)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    model = build_sharded(_cfg(**FP8_MODEL), seed=5)
    with torch.no_grad():
        for p in model.parameters():                 # weights far from the 0.006 init, so FP8 rounding matters
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_hf(model.to(torch.bfloat16), path)
    tensors = load_file(str(path / "model.safetensors"))
    for k in [k for k, v in tensors.items() if v.dim() == 2 and k.startswith("model.layers.")
              and ("_proj" in k) and "weights_proj" not in k]:
        tensors[k], tensors[k + "_scale_inv"] = quantize_fp8_blocks(tensors[k].float())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_fp8_import_equals_slices_of_the_full_import(fp8_checkpoint, layout):
    # what the trainer held before: the full import, loaded into its fp32 model
    full = {k: v.float() for k, v in import_hf(fp8_checkpoint).state_dict().items()}
    assert any(v.dtype == torch.float8_e4m3fn for v in load_file(str(fp8_checkpoint / "model.safetensors")).values())
    _assert_slices(full, _per_rank(layout, fp8_checkpoint, **FP8_MODEL), layout)


def test_a_rank_reads_only_the_bytes_of_its_slices(fp8_checkpoint):
    """What the loader materialises per rank is its shard: bytes read scale with 1 / (model-parallel size)."""
    on_disk = sum(v.numel() * v.element_size() for v in load_file(str(fp8_checkpoint / "model.safetensors")).values())
    read = {}
    for layout in ("tp1", "tp2", "pp2", "tp2.ep2.pp2"):
        cfg = _cfg(layout, **FP8_MODEL)
        world = cfg.parallel.nproc_per_node
        counts = []
        for rank in range(world) if world > 1 else [None]:
            ctx = _rank(cfg, rank) if rank is not None else _nullrank()
            with ctx as (par, bridge):
                with torch.device("meta"):
                    m = Transformer(cfg.model)
                if bridge:
                    with torch.device("meta"):
                        bridge.parallelize(m, par)
                with HFShards(fp8_checkpoint, cfg.model) as ckpt:
                    own = scales = 0           # the piece's bytes as stored, and at most every scale block
                    for local, piece in shard_view(m, par).items():
                        ckpt.values(local, piece, dict(m.named_parameters()).get(local, torch.empty(0)))
                        key = ckpt._locate(piece.name)[0]
                        own += torch.Size(piece.sizes).numel() * ckpt._meta(key)[0].itemsize
                        if key + "_scale_inv" in ckpt._where:
                            scales += torch.Size(ckpt._meta(key + "_scale_inv")[1]).numel() * 4
                    assert own <= ckpt.bytes_read <= own + scales, (layout, rank)
                    counts.append(ckpt.bytes_read)
        read[layout] = max(counts)
    print("\nbytes read by the busiest rank / checkpoint:", {k: f"{v / on_disk:.3f}" for k, v in read.items()})
    assert read["tp1"] == on_disk                              # one device reads every byte once
    assert read["tp2.ep2.pp2"] < read["pp2"] < read["tp2"] < on_disk   # the embedding and head stay whole


@contextmanager
def _nullrank():
    yield None, None


def _fused_experts(tensors: dict) -> dict:
    """transformers' layout: each MoE layer's experts as one [E, 2I, D] gate_up_proj and one [E, D, I] down_proj."""
    out, experts = {}, {}
    for k, v in tensors.items():
        if ".mlp.experts." in k:
            prefix, rest = k.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = v
        else:
            out[k] = v
    for prefix, by_e in experts.items():
        order = [by_e[e] for e in sorted(by_e)]
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat((p["gate_proj"], p["up_proj"])) for p in order])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([p["down_proj"] for p in order])
    return out


def test_fused_expert_layout_and_bad_checkpoints_are_named(tmp_path):
    export_hf(build_sharded(_cfg(), seed=3), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file(_fused_experts(tensors), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    full = import_hf(tmp_path).state_dict()
    for layout in ("tp2", "ep2"):
        _assert_slices(full, _per_rank(layout, tmp_path), layout)
    cfg = _cfg().model
    broken = dict(tensors)
    broken.pop("model.layers.0.self_attn.o_proj.weight")
    broken["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.o_proj\.weight"):
        HFShards(tmp_path, cfg)
    broken["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 63)
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj\.weight has shape \(64, 63\)"):
        HFShards(tmp_path, cfg)
    broken["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"]
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.extra\.weight"):
        HFShards(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"model\.n_heads=8 vs 4"):
        HFShards(tmp_path, _cfg(n_heads=8).model)
