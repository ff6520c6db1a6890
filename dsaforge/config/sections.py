"""One typed section per concern. Every field has a default so a preset only states what differs."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from dsaforge.config.base import Section
from dsaforge.config.model import ModelConfig


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["python-stdlib"],
        description="Local files/dirs (.txt, .jsonl, .parquet), fsspec URIs (s3://...), or the built-in 'python-stdlib'.")
    text_field: str = Field("text", description="Column/key holding the text in jsonl and parquet inputs.")
    max_documents: Optional[int] = Field(None, gt=0, description="Stop ingesting after this many documents.")
    min_doc_bytes: int = Field(16, ge=1)
    max_doc_bytes: int = Field(1_000_000, gt=0, description="Longer documents are truncated at a UTF-8 boundary.")
    dedup: bool = Field(True, description="Drop exact duplicate documents (by sha256 of the text).")
    seq_len: int = Field(4096, gt=1, description="Tokens per packed training sequence.")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="Share of documents held out for validation.")
    shard_sequences: int = Field(8192, gt=0, description="Packed sequences per Parquet shard.")
    tokenizer_train_bytes: int = Field(200_000_000, gt=0, description="Corpus bytes the BPE tokenizer is trained on.")
    seed: int = 0


class StageTrainConfig(Section):
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step (global).")
    micro_batch_size: int = Field(1, gt=0)
    seq_len: int = Field(4096, gt=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    indexer_loss_weight: float = Field(1.0, ge=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(4, gt=0)
    ckpt_every: int = Field(500, gt=0)
    keep_last: int = Field(2, gt=0)
    doc_mask: bool = Field(False, description="Long-context packing: attention and indexer top-k never cross a "
                                              "document boundary inside a packed sequence.")


class TrainConfig(Section):
    # Paper §2.1: dense warm-up at lr 1e-3 trains only the indexer; sparse training at lr 7.3e-6 trains all.
    pretrain: StageTrainConfig = Field(default_factory=lambda: StageTrainConfig(steps=1000, lr=3e-4, warmup_steps=100))
    warmup: StageTrainConfig = Field(default_factory=lambda: StageTrainConfig(steps=1000, lr=1e-3, batch_size=16, seq_len=131072))
    sparse: StageTrainConfig = Field(default_factory=lambda: StageTrainConfig(steps=15000, lr=7.3e-6, batch_size=480, seq_len=131072))
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = Field(False, description="Recompute each block's activations in the backward "
                                                              "pass (long context on one GPU).")
    replay_topk: bool = Field(True, description="With activation checkpointing in the sparse stage, hold each layer's "
                              "top-k indices ([B, S, top_k] int32) and indexer-KL target ([B, S, top_k] fp32) from "
                              "the forward for its recomputation instead of scoring, selecting and computing them again.")
    seed: int = 0
    deterministic: bool = False


class ParallelConfig(Section):
    tp: int = Field(1, gt=0, description="Tensor-parallel size.")
    pp: int = Field(1, gt=0, description="Pipeline-parallel size.")
    ep: int = Field(1, gt=0, description="Expert-parallel size.")
    nproc_per_node: int = Field(1, gt=0)
    nnodes: int = Field(1, gt=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    nvls: bool = Field(False, description="Let NCCL, NVSHMEM and torch's symmetric memory use NVLink multicast (NVLS). "
                       "Off by default: on hosts whose GPUs are shared, a job using multicast can put them out of service.")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.world_size % (self.tp * self.pp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp*pp = {self.tp * self.pp}")
        return self


class RLConfig(Section):
    steps: int = Field(100, gt=0)
    lr: float = Field(1e-6, gt=0)
    group_size: int = Field(16, gt=1, description="G samples per prompt (GRPO).")
    prompts_per_step: int = Field(32, gt=0)
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float = Field(0.28, gt=0)
    kl_coef: float = Field(0.001, ge=0, description="Weight of the unbiased K3 KL to the reference policy.")
    opsm_delta: float = Field(0.1, ge=0, description="Off-policy sequence masking threshold on mean log(pi_old/pi_theta).")
    keep_routing: bool = True
    keep_sampling_mask: bool = True
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k truncation.")
    max_new_tokens: int = Field(1024, gt=0)
    length_penalty: float = Field(0.0, ge=0)


class SandboxConfig(Section):
    backend: Literal["bwrap", "unsafe-subprocess"] = "bwrap"
    cpu_seconds: int = Field(10, gt=0)
    wall_seconds: float = Field(20.0, gt=0)
    memory_mb: int = Field(1024, gt=0)
    max_processes: int = Field(64, gt=0)
    max_output_bytes: int = Field(1_000_000, gt=0)


class SynthConfig(Section):
    agent_classes: list[Literal["general", "code", "search", "code_interpreter"]] = Field(
        default_factory=lambda: ["general", "code", "search", "code_interpreter"])
    tasks_per_class: int = Field(1000, gt=0)
    envs_per_class: int = Field(100, gt=0)
    max_difficulty: int = Field(5, gt=0)
    pass_k: int = Field(8, gt=0, description="Samples for the non-zero pass@k filter.")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of environments held out for evaluation.")
    workers: int = Field(2, gt=0)
    seed: int = 0
    llm_endpoint: Optional[str] = Field(None, description="OpenAI-compatible base URL for the LLM-driven mode.")
    llm_model: Optional[str] = Field(None, description="Model name at llm_endpoint/solver_endpoint; default: the first "
                                                       "one the endpoint lists.")
    llm_families: int = Field(3, ge=0, description="Task categories the LLM writes general-agent families for.")
    solver: Literal["baseline", "chat"] = Field(
        "baseline", description="Who runs the pass@k filter: the bounded baseline solver, or a chat model (the policy).")
    solver_endpoint: Optional[str] = Field(None, description="OpenAI-compatible URL of the policy when solver=chat.")
    targets: dict[Literal["general", "code", "search", "code_interpreter"], tuple[int, int]] = Field(
        default_factory=dict, description="Per-class (tasks, environments) overriding tasks_per_class/envs_per_class.")
    corpus_documents: int = Field(1500, gt=0, description="Documents in the search agent's offline corpus.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.solver == "chat" and not self.solver_endpoint:
            raise ValueError("solver=chat needs solver_endpoint (an OpenAI-compatible URL)")
        return self


EVAL_SUITES = ("lm", "long-context", "agentic", "code", "reasoning", "efficiency")


class LongContextEvalConfig(Section):
    tasks: list[Literal["passkey", "multikey", "variable-tracking"]] = Field(
        default_factory=lambda: ["passkey", "multikey", "variable-tracking"])
    lengths: list[int] = Field(default_factory=list, description="Context lengths in tokens; empty: doubling from "
                               "1/8 of model.max_seq_len up to it.")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="Insertion depths of the needle, as a fraction of the haystack.")
    samples: int = Field(4, gt=0, description="Prompts per (task, length, depth) cell.")
    haystack_files: list[str] = Field(default_factory=list, description="Text files for the haystack; empty: the "
                                      "prepared documents (prepare-data input).")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "LongContextEvalConfig":
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if any(n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be at least 64 tokens, got {self.lengths}")
        return self


class EfficiencyEvalConfig(Section):
    gpu_hour_usd: float = Field(2.0, gt=0, description="Price of one GPU-hour (the paper's cost figure: $2 per "
                                "H800-hour).")
    positions: list[int] = Field(default_factory=list, description="Context positions to measure; empty: doubling "
                                 "from 4096 up to model.max_seq_len.")
    prefill_chunk: int = Field(2048, gt=0, description="Tokens prefilled at each position (cost of the next chunk).")
    decode_batch: int = Field(32, gt=0, description="Sequences decoded together.")
    repeats: int = Field(5, gt=0, description="Timed repetitions per point (after one warm-up).")


class EvalConfig(Section):
    suites: list[Literal["lm", "long-context", "agentic", "code", "reasoning", "efficiency"]] = Field(
        default_factory=lambda: ["lm", "long-context", "agentic", "code", "reasoning"],
        description="Suites the evaluate stage runs; efficiency needs a GPU.")
    max_samples: int = Field(500, gt=0, description="Most prompts per suite and task (held-out batches, HumanEval "
                             "problems, agentic tasks per class, reasoning items per task).")
    max_new_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy (pass@1 only); > 0: sampled, for pass@k.")
    top_p: float = Field(0.95, gt=0, le=1)
    samples: int = Field(1, gt=0, description="Completions per prompt for pass@k / pass^k (n).")
    pass_k: list[int] = Field(default_factory=lambda: [1, 2, 4], description="k values reported (k <= samples).")
    batch_size: int = Field(4, gt=0, description="Sequences per forward pass.")
    max_turns: int = Field(8, ge=0, description="Tool-calling segments per agentic episode.")
    lm_seq_len: int = Field(0, ge=0, description="Held-out perplexity window; 0: data.seq_len.")
    reasoning_tasks: list[str] = Field(
        default_factory=lambda: ["basic_arithmetic", "leg_counting", "chain_sum", "word_sorting"],
        description="reasoning-gym dataset names, each scored by its own verifier.")
    long_context: LongContextEvalConfig = Field(default_factory=LongContextEvalConfig)
    efficiency: EfficiencyEvalConfig = Field(default_factory=EfficiencyEvalConfig)
    report_metrics: list[str] = Field(
        default_factory=lambda: ["train/lm_loss", "val/lm_loss", "train/indexer_kl", "val/indexer_kl", "rl/reward"],
        description="Metrics plotted in the report from the pipeline's runs, by name.")
    seed: int = 0


class TrackingConfig(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else SQLite under pipeline.home.")
    experiment: str = "dsaforge"
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)


class PipelineConfig(Section):
    home: str = Field(".dsaforge", description="Local state: MLflow store, KFP outputs, run records.")
    image: str = Field("dsaforge:0.1.0", description="Container image for cluster runs.")
    namespace: str = "kubeflow"
    gpu_type: str = Field("nvidia.com/gpu", description="Accelerator resource name on the cluster.")
    gpus_per_stage: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_toleration: bool = True
    caching: bool = False


class Config(Section):
    preset: str = "base"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
