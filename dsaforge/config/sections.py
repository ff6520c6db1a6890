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
    # Supervised fine-tuning on the synthesized tasks' reference trajectories, before RL (loss on assistant tokens).
    sft: StageTrainConfig = Field(default_factory=lambda: StageTrainConfig(steps=500, lr=1e-5, batch_size=64, seq_len=8192,
                                                                           warmup_steps=20, weight_decay=0.0))
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


class RewardConfig(Section):
    """reward = outcome_weight * verifier score + format_weight * well-formed + length term + custom terms."""
    outcome_weight: float = Field(1.0, ge=0, description="Weight of the task verifier's score in [0, 1].")
    format_weight: float = Field(0.0, ge=0, description="Bonus for an episode whose every turn parsed and that "
                                                        "submitted an answer.")
    length_weight: float = Field(0.0, ge=0, description="Length penalty: minus this times the share of the "
                                 "response budget used beyond length_target tokens.")
    length_target: int = Field(0, ge=0, description="Response tokens allowed before the length penalty starts.")
    custom: dict[str, float] = Field(default_factory=dict, description="Extra reward functions by dotted path "
                                     "('package.module:function' or 'package.module.function') -> weight; each is "
                                     "called with the episode record and returns a float.")


class RLConfig(Section):
    """GRPO with DeepSeek-V3.2's four stabilisers (paper §3.1); every stabiliser has its switch here."""
    steps: int = Field(100, gt=0)
    lr: float = Field(1e-6, gt=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine decay to lr * this at the last step (1: constant).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up of the learning rate over the first steps: "
                              "AdamW's first updates move every weight by about lr whatever its gradient's noise.")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    group_size: int = Field(16, gt=1, description="G samples per prompt (GRPO).")
    prompts_per_step: int = Field(32, gt=0)
    updates_per_step: int = Field(1, gt=0, description="Optimizer steps per rollout batch (mini-batches); > 1 makes "
                                  "the later ones off-policy, which OPSM and the clip guard against.")
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch (PPO epochs), each of "
                        "updates_per_step optimizer steps: > 1 gets more from each batch of rollouts; every pass "
                        "after the first is off-policy, bounded by the clip and OPSM.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward in the policy update.")
    mode: Literal["dense", "sparse"] = Field("sparse", description="Attention in sft, rollouts and training: the "
                                             "DSA model's top-k attention, or dense MLA.")
    agent_classes: list[Literal["general", "code", "search", "code_interpreter"]] = Field(
        default_factory=lambda: ["general", "code", "search", "code_interpreter"],
        description="Task classes GRPO trains and evaluates on.")
    std_normalize: bool = Field(False, description="Divide group advantages by their std (original GRPO); the paper "
                                "and Dr.GRPO centre only.")
    aggregation: Literal["sequence", "token", "dr_grpo"] = Field(
        "sequence", description="sequence: 1/|o_i| per sequence (paper Eq. 5); token: mean over all tokens; dr_grpo: "
        "sum / (sequences x max_new_tokens).")
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float = Field(0.28, gt=0)
    unbiased_kl: bool = Field(True, description="K3 x (pi_theta/pi_old), not detached (paper Eq. 7); off: plain K3.")
    kl_coef: float = Field(0.001, ge=0, description="beta of the KL to the reference policy, for task domains not in "
                           "kl_coef_by_class (0: no KL term, no reference model).")
    kl_coef_by_class: dict[Literal["general", "code", "search", "code_interpreter"], float] = Field(
        default_factory=dict, description="beta per agent class (task domain); 0 allowed (the paper omits it for math).")
    opsm: bool = Field(True, description="Off-policy sequence masking (paper Eq. 8-9).")
    opsm_delta: float = Field(0.1, ge=0, description="OPSM threshold on a sequence's mean log(pi_old/pi_theta).")
    keep_routing: bool = Field(True, description="Replay the engine's MoE routes in the training forward.")
    keep_sampling_mask: bool = Field(True, description="Renormalise pi_theta over the engine's top-p/top-k kept sets.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k truncation.")
    max_new_tokens: int = Field(1024, gt=0, description="Tokens per assistant segment (and the length penalty's "
                                "budget).")
    max_turns: int = Field(8, gt=0, description="Segments that call tools, per episode.")
    context_len: int = Field(0, ge=0, description="Tokens per sequence the rollout engine's cache holds (0: "
                             "model.max_seq_len). Its cache is allocated for min(256, prompts x group) sequences "
                             "of this length up front, so bound it to the episodes' length on large models.")
    diagnostics: bool = Field(False, description="Each step, also score one micro-batch with Keep Routing and with "
                              "Keep Sampling Mask switched off (rl/diag/*): the stabilisers' effect on the same run.")
    eval_every: int = Field(10, gt=0, description="Held-out evaluation every this many steps (and at the end).")
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts per evaluation (one episode each).")
    eval_sampled: bool = Field(False, description="Evaluate with the training sampling settings (pass@1 of the "
                               "sampled policy) instead of greedy decoding.")
    save_every: int = Field(50, gt=0)
    seed: int = 0
    reward: RewardConfig = Field(default_factory=RewardConfig)

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        if self.clip_eps_low >= 1:
            raise ValueError(f"clip_eps_low {self.clip_eps_low} must be < 1 (the ratio is clipped at 1 - eps)")
        return self


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
    shards: int = Field(1, ge=1, le=4096, description="Split synthesis into this many shards, run as parallel "
                        "pipeline tasks (dsl.ParallelFor) and merged; each shard uses `workers` processes.")
    shard_overbuild: float = Field(1.0, ge=0, description="Shards also build this fraction more environments "
                                   "than the first round, for the top-up rounds, so the merge builds few itself.")
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
    connect_timeout_s: float = Field(10.0, gt=0, description="Timeout of one request to a tracking server.")
    retries: int = Field(3, ge=0, description="Retries of a failed tracking request (exponential backoff); with the "
                         "defaults a call to a dead server gives up within about a minute.")
    backoff_s: float = Field(2.0, ge=0, description="Backoff factor between retries: waits of 0, 2b, 4b, ... seconds.")
    model_max_mb: float = Field(2048.0, ge=0, description="A model stage's LoggedModel holds its HF export's files "
                                "when they are smaller than this; above, a reference to the checkpoint's URI.")
    register_as: Optional[str] = Field(None, description="Register the pipeline's final model as a version of this "
                                       "MLflow registered model when the pipeline succeeds.")


class SecretEnv(Section):
    """A Kubernetes Secret whose keys become environment variables in every task's pod."""
    name: str = Field(min_length=1)
    keys: dict[str, str] = Field(description="Secret key -> environment variable name.")
    optional: bool = Field(False, description="Start the pod even when the Secret or a key is missing.")


class Toleration(Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = "NoSchedule"


class TaskResources(Section):
    """Per-stage overrides of the placement the stage registry gives (dsaforge.stages.STAGES)."""
    cpu: Optional[str] = Field(None, description="CPU request, e.g. '8' or '500m'.")
    memory: Optional[str] = Field(None, description="Memory request, e.g. '64G'.")
    gpus: Optional[int] = Field(None, ge=0, description="Accelerators per task (per node for a TrainJob).")
    timeout_s: Optional[int] = Field(None, ge=0, description="Kill the pod after this long (0: no limit).")
    retries: Optional[int] = Field(None, ge=0)


def _default_secrets() -> list[SecretEnv]:
    # The conventions the Helm chart and docs/deployment.md use; optional so a cluster may provide either.
    return [SecretEnv(name="dsaforge-mlflow", optional=True, keys={
                "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN"}),
            SecretEnv(name="dsaforge-storage", optional=True, keys={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"})]


class PipelineConfig(Section):
    home: str = Field(".dsaforge", description="Local state: MLflow store, KFP outputs, run records.")
    image: str = Field("dsaforge:0.1.0", description="Container image of GPU tasks on a cluster (the CUDA image).")
    cpu_image: str = Field("dsaforge-cpu:0.1.0", description="Container image of CPU-only tasks on a cluster.")
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    namespace: str = "kubeflow"
    gpu_type: str = Field("nvidia.com/gpu", description="Accelerator resource name on the cluster.")
    gpus_per_stage: int = Field(0, ge=0, description="Accelerators per GPU task (per node for multi-node stages).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels GPU tasks require, e.g. "
                                          "{'nvidia.com/gpu.product': 'NVIDIA-H200'}.")
    cpu_node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels CPU tasks require.")
    gpu_toleration: bool = Field(True, description="GPU tasks tolerate the `<gpu_type>` NoSchedule taint.")
    tolerations: list[Toleration] = Field(default_factory=list, description="More tolerations for GPU tasks.")
    workspace_pvc: Optional[str] = Field(None, description="An existing PersistentVolumeClaim mounted in every task "
                                         "at workspace_mount; training checkpoints go there (survive retries).")
    workspace_mount: str = "/workspace"
    shm_size: Optional[str] = Field(None, description="Size limit of the memory-backed /dev/shm of GPU tasks.")
    secrets: list[SecretEnv] = Field(default_factory=_default_secrets,
                                     description="Secrets exposed as env in every task (MLflow, object storage).")
    env: dict[str, str] = Field(default_factory=dict, description="Plain environment variables for every task.")
    retries: int = Field(2, ge=0, description="Retries of a failed task (transient failures: preemption, eviction).")
    retry_backoff_s: int = Field(60, ge=0, description="First retry delay; doubles up to an hour.")
    timeout_s: int = Field(0, ge=0, description="Default task timeout (0: none).")
    resources: dict[str, TaskResources] = Field(default_factory=dict, description="Per-stage placement overrides.")
    caching: bool = Field(False, description="Reuse a task's outputs when its stage, config and inputs are unchanged.")
    host: Optional[str] = Field(None, description="Kubeflow Pipelines API URL for `dsaforge submit` ($KFP_HOST).")
    kfp_experiment: str = Field("dsaforge", description="KFP experiment that submitted runs go to.")
    trainer_runtime: str = Field("torch-distributed", description="Kubeflow Trainer ClusterTrainingRuntime of "
                                 "multi-node stages.")


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

    @model_validator(mode="after")
    def _check_stages(self) -> "Config":
        """What the trainer would otherwise find only after building the model and reading the data."""
        # data.seq_len is not checked against max_seq_len: it is the packing row length, and each stage re-cuts
        # the token stream to its own seq_len.
        dp = max(1, self.parallel.world_size // (self.parallel.tp * self.parallel.pp))
        problems = []
        for name in ("pretrain", "warmup", "sparse"):
            s = getattr(self.train, name)
            if s.batch_size % (s.micro_batch_size * dp):
                problems.append(f"train.{name}.batch_size {s.batch_size} is not a multiple of micro_batch_size "
                                f"{s.micro_batch_size}" + (f" x data-parallel size {dp}" if dp > 1 else ""))
            if s.seq_len > self.model.max_seq_len:
                problems.append(f"train.{name}.seq_len {s.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
