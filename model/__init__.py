"""dsaforge.model: DeepSeek-V3.2 (MLA + DSA lightning indexer + DeepSeekMoE + MTP), single-device PyTorch.

Math only: no I/O beyond `hf` (checkpoint import/export), no torch.distributed. Sparse attention and indexer
scoring go through `dsaforge.kernels`, whose torch reference is the CPU fallback.
"""
if __name__ == "model":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
else:
    from dsaforge.model.attention import MLA, Indexer, LayerCache, indexer_kl
    from dsaforge.model.moe import Gate, MoE
    from dsaforge.model.transformer import (
        Cache,
        ModelOutput,
        Transformer,
        backbone_parameters,
        indexer_parameters,
        lm_loss,
        set_trainable,
        update_router_bias,
    )

    __all__ = [
        "Cache", "Gate", "Indexer", "LayerCache", "MLA", "ModelOutput", "MoE", "Transformer", "backbone_parameters",
        "indexer_kl", "indexer_parameters", "lm_loss", "set_trainable", "update_router_bias",
    ]
