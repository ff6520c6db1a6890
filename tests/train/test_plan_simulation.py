"""The v32 preset under a fake process group of 64 ranks (one process, torch's `fake` backend): the megatron bridge
shards a meta-device model exactly as the memory plan counts, and no rank holds the full model."""
import pytest
import torch
import torch.distributed as dist

from dsaforge.config import preset
from dsaforge.model.accounting import count_params
from dsaforge.model.train.plan import Layout, plan, rank_plan

fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
WORLD = 64


@pytest.mark.slow
def test_v32_on_64_fake_ranks_matches_the_plan():
    from megatron.core import parallel_state as ps
    from dsaforge.model import megatron_bridge as bridge
    from dsaforge.model.transformer import Transformer
    cfg = preset("v32")
    cfg.train.activation_checkpointing = True
    rows, _ = plan(cfg, WORLD, 141, seq_len=4096)
    least = rows[0]                                   # v32 fits nowhere on 64 H200s: simulate the least loaded
    tp, pp, ep, dp = (int(p[2:]) for p in least.layout.split("."))
    p = cfg.parallel
    p.tp, p.pp, p.ep, p.nproc_per_node, p.nnodes = tp, pp, ep, 8, WORLD // 8
    total = count_params(cfg.model, include_mtp=True)[0]
    planned = rank_plan(cfg, Layout(tp, pp, ep, dp), "sparse", 4096, 141).params
    for rank in (0, WORLD - 1):
        dist.init_process_group("fake", rank=rank, world_size=WORLD, store=fake_pg.FakeStore())
        try:
            par = bridge.init_parallel(cfg, torch.device("cpu"))
            with torch.device("meta"):
                model = Transformer(cfg.model)
            bridge.parallelize(model, par)
            held = sum(t.numel() for t in model.parameters())
            assert all(t.is_meta for t in model.parameters())      # nothing was materialised on the way
            print(f"\nrank {rank} ({least.layout}): {held / 1e9:.3f}B parameters, plan {planned / 1e9:.3f}B, "
                  f"model {total / 1e9:.1f}B")
            assert held == planned
            assert held < total / 20
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
