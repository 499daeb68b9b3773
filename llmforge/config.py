"""Configs: one dataclass per stage, named presets, TOML files and `--set key=value` overrides.

Resolution order (later wins): preset defaults -> the run directory's recorded config.toml
(when no --preset is given) -> --config FILE.toml -> --set overrides.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from llmforge.data.script_rules import CharCleanConfig  # zh/ja/ko/th rules live beside them
from llmforge.errors import UserError
from llmforge.scaling.config import ScalingConfig  # the stage's knobs live beside it


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 2          # grouped-query attention: n_head must be a multiple of this
    d_model: int = 384
    d_ff: int = 0               # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False      # Qwen2-style q/k/v biases (imported models)
    init_std: float = 0.02
    zero_init_residual: bool = False  # o_proj and down_proj start at zero (each block starts as the identity)
    qk_norm: bool = False       # RMSNorm on each head's queries and keys before RoPE (OLMo 2, Qwen3)
    smear_layers: int = 0       # the lowest this many layers mix each key with the previous position's (Olsson et al. 2022)
    # mixture of experts (model/moe.py); moe_experts = 0 keeps every MLP dense
    moe_experts: int = 0        # routed SwiGLU experts per MoE layer; 0 = dense model
    moe_top_k: int = 2          # experts per token (token choice); expert choice: the average per token
    moe_every: int = 1          # layer i (from 0) is MoE when (i + 1) % moe_every == 0 (Qwen2-MoE's decoder_sparse_step)
    moe_shared_experts: int = 0  # experts every token also goes through, ungated (DeepSeek-MoE, Qwen2-MoE)
    moe_d_ff: int = 0           # width of one expert; 0 = the dense width / (top_k + shared): equal active parameters
    moe_router: str = "token_choice"  # token_choice (top-k, Switch/Mixtral) | expert_choice (Zhou et al. 2022)
    moe_capacity_factor: float = 1.25  # an expert processes at most ceil(this * top_k * tokens / experts) tokens in training
    moe_aux_coef: float = 0.01  # weight of the Switch/GShard load-balancing loss (token choice)
    moe_z_coef: float = 0.001   # weight of the ST-MoE router z-loss

    def validate(self) -> None:
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                            "pick a head count that divides the width")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.n_kv_head}; "
                            "set n_kv_head to a divisor of n_head")
        if (self.d_model // self.n_head) % 2:
            raise UserError(f"head size {self.d_model // self.n_head} is odd; RoPE needs an even head size")
        for name in ("vocab_size", "n_layer", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.moe_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        E, k = self.moe_experts, self.moe_top_k
        if E < 0:
            raise UserError(f"model.moe_experts={E} is negative; use 0 for a dense model or the number of experts")
        if not 1 <= k <= E:
            raise UserError(f"model.moe_top_k={k} must be between 1 and model.moe_experts={E}; "
                            f"lower moe_top_k or add experts")
        if not self.moe_capacity_factor > 0:
            raise UserError(f"model.moe_capacity_factor={self.moe_capacity_factor} must be > 0 "
                            "(1.0 = exactly top_k * tokens / experts per expert; Switch uses 1.25)")
        if not 1 <= self.moe_every <= self.n_layer:
            raise UserError(f"model.moe_every={self.moe_every} selects no MoE layer of model.n_layer={self.n_layer} "
                            f"(layer i is MoE when (i + 1) % moe_every == 0); pick 1..{self.n_layer}")
        if self.moe_router not in ("token_choice", "expert_choice"):
            raise UserError(f"model.moe_router='{self.moe_router}' is not a router; choose token_choice or expert_choice")
        for name in ("moe_shared_experts", "moe_d_ff", "moe_aux_coef", "moe_z_coef"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name}={getattr(self, name)} is negative; use 0 or more")
        if self.expert_dim < 1:
            raise UserError(f"an expert would have width {self.expert_dim}; set model.moe_d_ff")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def expert_dim(self) -> int:
        """One expert's SwiGLU width: moe_d_ff, or the dense width split over the active experts."""
        return self.moe_d_ff or self.ffn_dim // (self.moe_top_k + self.moe_shared_experts)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 64 * -(-int(8 * self.d_model / 3) // 64)


@dataclass
class SourceConfig:
    """One entry of the data mixture. kind: stdlib | pydoc | files | hf | manpages."""
    name: str = "stdlib"
    kind: str = "stdlib"
    path: str = ""              # files: path or glob (comma-separated ok); hf: dataset name or local dir
    weight: float = 1.0         # sampling weight in the mixture (1.0 = one pass; 2.0 = seen twice)
    text_field: str = "text"    # .jsonl / .parquet / hf column holding the text
    split: str = "train"        # hf split
    code: bool = False          # code gets the lighter cleaning rules
    max_docs: int = 0           # 0 = no cap (caps keep tiny presets tiny)
    include_tests: bool = True  # stdlib: also read the test/ and tests/ packages (about 60% of it)
    languages: list[str] = field(default_factory=list)  # keep only these languages (ISO 639-1: "zh", "en"); [] = all
    encoding: str = "utf-8"     # files: the files' text encoding (e.g. "gb18030", "big5", "utf-16")
    licenses: list[str] = field(default_factory=list)   # files: keep only these SPDX ids ("MIT", "Apache-2.0"); [] = no check


@dataclass
class CleanConfig:
    """Document quality rules (data/clean.py). Prose rules follow Gopher (Rae et al. 2021,
    app. A) and C4 (Raffel et al. 2020); code rules follow The Stack / StarCoder."""
    min_words: int = 50                 # prose: fewer words = a stub page
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # ("#" + "..." + "…") per word: hashtag/teaser spam
    min_alpha_word_fraction: float = 0.8  # share of words with a letter in them
    max_ellipsis_line_fraction: float = 0.3
    max_bullet_line_fraction: float = 0.9
    max_duplicate_line_fraction: float = 0.3  # repeated non-blank lines: menus, spam
    max_boilerplate_line_fraction: float = 0.5  # cookie / javascript / legal notices
    code_min_chars: int = 50
    code_max_line_len: int = 1000       # longer lines are minified or generated data
    code_max_mean_line_len: float = 100.0
    code_min_alnum_fraction: float = 0.25  # below this: base64 blobs, tables of numbers
    code_max_duplicate_line_fraction: float = 0.6
    max_chars: int = 1_000_000          # both: larger files are data dumps, not documents


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig(name="stdlib", kind="stdlib", weight=1.0, code=True),
        SourceConfig(name="pydoc", kind="pydoc", weight=2.0),
    ])
    val_fraction: float = 0.02      # share of documents (by hash) held out for validation
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8     # MinHash LSH Jaccard threshold for near-duplicates
    num_perm: int = 128             # MinHash permutations
    shard_tokens: int = 10_000_000  # tokens per shard file
    workers: int = 0                # tokenizer processes; 0 = all cores
    seed: int = 0
    shingle_words: int = 5          # near-dedup compares sets of this many consecutive words
    clean: CleanConfig = field(default_factory=CleanConfig)
    shingle_chars: int = 5          # zh/ja/ko/th near-dedup: shingles of this many characters (not words)
    clean_chars: CharCleanConfig = field(default_factory=CharCleanConfig)  # rules for zh/ja/ko/th documents
    language_weights: dict[str, float] = field(default_factory=dict)  # a document's weight x this ({zh = 2.0}); missing = 1
    engine: str = "builtin"         # step 1 (read, clean, dedup, mix) runs: builtin | datatrove (data/datatrove_pipeline.py)
    engine_tasks: int = 2           # datatrove: parallel tasks for reading + cleaning (dedup runs as one task)


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    sample_bytes: int = 20_000_000  # mixture sample the BPE merges are learned from
    single_digits: bool = True      # every digit its own token (as Llama); False: GPT-4 1-3 digit groups
    whole_numbers: bool = False     # with digit groups: every group "0".."999" is one token (numbers copy as one token)
    cjk_chunk: int = -1             # Han/kana runs pre-split into pieces of <= this many chars; 0 = off (GPT-4); -1 = auto (4 if the mix has zh/ja)


@dataclass
class TasksConfig:
    """The verifiable tasks every alignment stage trains and evaluates on (llmforge/tasks)."""
    names: str = ""                 # comma-separated task names; "" = all
    max_new_tokens: int = 96        # ceiling on each task's own answer budget (Task.max_new_tokens): the longest
                                    # answer sampled for a task prompt (SFT eval, RM pairs, RL, eval)


@dataclass
class TrainConfig:
    """The knobs of the one training loop (train/loop.py), shared by every stage."""
    batch_size: int = 16        # sequences per micro-batch per process
    seq_len: int = 256
    grad_accum: int = 1         # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1   # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 50
    schedule: str = "cosine"    # cosine | wsd (warmup-stable-decay) | constant
    optimizer: str = "adamw"    # adamw | muon (Muon for the blocks' 2-D weights, AdamW for the rest)
    muon_lr: float = 0.02       # muon: peak lr of the hidden matrices (same schedule shape as lr)
    decay_fraction: float = 0.2 # wsd: share of steps spent decaying
    max_steps: int = 1000       # budget; the smallest of steps / tokens / minutes wins
    max_tokens: int = 0         # 0 = unbounded
    minutes: float = 0.0        # 0 = unbounded; the lr schedule is stretched to fit the time
    plan_after: int = 0         # > 0 with minutes: after this many steps, fix max_steps to what fits the minutes at
                                # their speed, evaluations included (one is timed then); the schedule (and
                                # midtraining) then follow steps: deterministic given the plan, which is saved
                                # for resume (pretrain's midtraining needs it)
    dtype: str = "auto"         # auto | bf16 | fp32 (auto: bf16 on CUDA and on CPUs with bf16)
    compile: bool = False
    parallel: str = "ddp"       # ddp (every rank holds the whole model) | fsdp (FSDP2: params, grads, optimizer state sharded)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 0       # 0 = no samples
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 1337
    # LoRA (llmforge/model/lora.py): rank 0 = full fine-tuning; >0 trains low-rank adapters only
    lora_rank: int = 0
    lora_alpha: float = 16.0                # adapter output scaled by alpha / rank
    lora_targets: str = "q_proj,v_proj"     # comma-separated Linear names, or "all-linear"
    lora_dtype: str = "fp32"                # frozen base weights: fp32 | bf16 | int8 | nf4 (bitsandbytes, CUDA)


@dataclass
class PretrainConfig(TrainConfig):
    mid_fraction: float = 0.0       # the last share of the steps is midtraining: conversations mixed in
    mid_chat_share: float = 0.3     # share of each midtraining batch's rows that are conversations
    mid_examples_per_task: int = 2000  # train conversations per task for midtraining (+ spelling drills)
    mid_spelling_examples: int = 3000
    mid_copy_examples: int = 0      # "Repeat exactly: 55278" drills (tasks/copying.py): copying from the context
    plan_after: int = 50            # with minutes: the steps timed (from step 10) before the step count is fixed
    eval_tasks_per_task: int = 0    # > 0: each eval also scores this many held-out items per task, few-shot


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 1e-3
    warmup_steps: int = 20
    max_steps: int = 400
    eval_every: int = 100
    ckpt_every: int = 100
    examples_per_task: int = 2000   # train conversations generated per task
    spelling_examples: int = 3000   # "Spell 'word'." drills on corpus words (never the eval words)
    copy_examples: int = 0          # "Repeat exactly: 55278" drills on random strings (tasks/copying.py)
    text_share: float = 0.2         # share of rows that are pretraining text (no forgetting), exact over the run
    eval_per_task: int = 50         # held-out items per task for verified accuracy
    user_data: str = ""             # JSONL conversations in the `messages` format
    packing: bool = True


@dataclass
class RMConfig(TrainConfig):
    lr: float = 5e-4
    warmup_steps: int = 10
    max_steps: int = 200
    eval_every: int = 50
    ckpt_every: int = 100
    margin: bool = True             # Llama 2 margin term in the Bradley-Terry loss
    user_prefs: str = ""
    prompts_per_task: int = 100     # train prompts per task sampled for preference pairs
    samples_per_prompt: int = 4     # SFT samples per prompt, graded by the verifiers
    heldout_per_task: int = 20      # held-out prompts per task for pairwise accuracy
    safety_prompts: int = 0         # train prompts of the safety task (0: prompts_per_task): what the safety RM learns from
    safety_heldout: int = 0         # held-out safety prompts (0: heldout_per_task); about half are benign-but-edgy,
                                    # the false-refusal rate's denominator
    safety: bool = True             # also train the safety reward model (ckpt/rm_safety)
    safety_threshold: float = 0.15  # Llama 2: use the safety score when sigmoid(it) < this
    pair_sources: str = "form,helpfulness,refusal,format,verifier"   # pair kinds built (stages/prefs.py)
    pairs_per_source: int = 2       # pairs of each source per prompt (on-policy first, then constructed)
    verified_rm_weight: float = 0.2  # reward = verifier + this x tanh(RM score) where a verifier grades


@dataclass
class RLConfig(TrainConfig):
    """[rl]: what every RL algorithm shares (the loop, sampling, evaluation). Each algorithm's own
    knobs live beside it, TRL-style: [rejection] rejection.py, [ppo] ppo.py, [dpo] dpo.py, [grpo] grpo.py."""
    algo: str = "ppo"
    lr: float = 2e-5
    warmup_steps: int = 0
    max_steps: int = 50
    eval_every: int = 10
    ckpt_every: int = 10
    temperature: float = 1.0        # sampling temperature of rollouts
    init: str = "sft"               # checkpoint folder the policy (and reference) start from
    eval_per_task: int = 30         # held-out items per task for verified accuracy (and checkpoint choice)
    select_p: float = 0.05          # publish an RL checkpoint over the initial policy only if it is better on the
                                    # validation items with paired-bootstrap p below this (1.0: the best, however noisy)
    train_layers: int = 0           # > 0: train only the top k transformer layers (+ norm, heads)


def _stage_config(stage: str, name: str):
    """A config dataclass that lives beside its stage (stages/<stage>.py), imported when a Config is made."""
    import importlib
    return getattr(importlib.import_module(f"llmforge.stages.{stage}"), name)()


def _rl_algo_config(algo: str):
    """The config dataclass that lives beside stages/rl/<algo>.py, imported when a Config is made
    (a module-level import would be circular: the stage imports this module)."""
    import importlib
    return importlib.import_module(f"llmforge.stages.rl.{algo}").CONFIG()


@dataclass
class EvalConfig:
    eval_per_task: int = 50
    pass_k: int = 4
    pass_k_per_task: int = 0    # pass@k over the first this-many items per task (0 = all; k samples each)
    arena_battles: int = 200
    bootstrap: int = 200
    seed: int = 0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    db: str = ""                    # feedback store: SQLite path or postgresql:// URL ("" = RUN_DIR/feedback.sqlite)
    index: str = ""                 # retrieval index (SQLite); "" = RUN_DIR/index.sqlite when it exists
    batch_wait_ms: float = 5.0      # an idle server waits this long so requests arriving together share a step
    default_max_tokens: int = 256   # when a request gives no max_tokens (capped by the context left)
    max_n: int = 8                  # largest `n` (choices per request) accepted
    builtin_tools: bool = True      # run the calculator / Python sandbox when the model calls them
    retrieval_k: int = 3            # chunks retrieved per request with retrieval on
    max_body_bytes: int = 4 << 20   # larger request bodies are refused with 413 before they are read
    max_queue: int = 64             # engine requests waiting for a slot before new ones get 429 + Retry-After
    tool_workers: int = 4           # built-in tool calls run in this many worker threads, off the batch
    api_keys: str = ""              # comma-separated keys (or NAME=KEY), each a user; also LLMFORGE_API_KEYS
    rate_limit_rpm: float = 0.0     # generation requests per minute per user (token bucket); 0 = no limit
    rate_limit_burst: int = 0       # requests a user may send at once before the rate applies; 0 = 10 s of rpm
    prefix_cache_tokens: int = 8192 # keys/values of recent prompts' leading blocks reused by prompts sharing them; 0 = off
    dtype: str = "fp32"             # inference weights: fp32 | bf16 | int8 (weight-only, per channel; infer/quantize.py)
    speculate: int = 0              # prompt-lookup speculative decoding: draft tokens per row per step; 0 = off
    compile: bool = False           # torch.compile the decode step (infer/compiled.py), every batch bucket at start-up; off: no gain at a busy server's ~30-row batches here


@dataclass
class Config:
    preset: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rejection: typing.Any = field(default_factory=lambda: _rl_algo_config("rejection"))
    ppo: typing.Any = field(default_factory=lambda: _rl_algo_config("ppo"))
    dpo: typing.Any = field(default_factory=lambda: _rl_algo_config("dpo"))
    grpo: typing.Any = field(default_factory=lambda: _rl_algo_config("grpo"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    vision: typing.Any = field(default_factory=lambda: _stage_config("vision", "VisionConfig"))
    flywheel: typing.Any = field(default_factory=lambda: _stage_config("flywheel", "FlywheelConfig"))


# ---------------------------------------------------------------- presets

def _micro(c: Config) -> None:
    """The whole pipeline in well under a minute: for tests and smoke runs."""
    c.model = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
    c.tokenizer = TokenizerConfig(vocab_size=512, sample_bytes=1_000_000)
    c.data.sources = [SourceConfig(name="stdlib", kind="stdlib", weight=1.0, code=True, max_docs=120),
                      SourceConfig(name="pydoc", kind="pydoc", weight=1.0, max_docs=150)]
    c.data.shard_tokens = 200_000
    c.pretrain = PretrainConfig(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10, max_steps=150,
                                eval_every=50, eval_batches=4, ckpt_every=50, log_every=10, mid_fraction=0.2,
                                mid_examples_per_task=200, mid_spelling_examples=200)
    # alignment stages: seconds each (tests/test_alignment.py runs them end to end)
    c.sft = SFTConfig(batch_size=16, seq_len=128, lr=5e-3, warmup_steps=10, max_steps=500, eval_every=0,
                      ckpt_every=0, log_every=10, examples_per_task=300, eval_per_task=8,
                      spelling_examples=300)
    c.rm = RMConfig(batch_size=16, seq_len=128, lr=1e-3, warmup_steps=5, max_steps=40, eval_every=0,
                    ckpt_every=0, log_every=10, prompts_per_task=12, samples_per_prompt=2, heldout_per_task=6,
                    safety_prompts=48, safety_heldout=24)
    c.rl = RLConfig(batch_size=8, seq_len=128, lr=1e-4, max_steps=8, eval_every=0, ckpt_every=0, log_every=2,
                    eval_per_task=8)
    c.tasks = TasksConfig(max_new_tokens=40)
    c.rejection = dataclasses.replace(c.rejection, prompts=16, group_size=4, rounds=2, steps_per_round=10, lr=3e-4)
    c.ppo = dataclasses.replace(c.ppo, prompts_per_rollout=8, ppo_epochs=2, curve_points=0)
    c.grpo = dataclasses.replace(c.grpo, prompts_per_rollout=4, group_size=4, ppo_epochs=1, max_draws=3)
    c.eval = EvalConfig(eval_per_task=8, pass_k=2, bootstrap=50)
    c.flywheel = dataclasses.replace(c.flywheel, users=4, conversations=12, concurrency=4, dpo_steps=4,
                                     batch_size=4, eval_per_task=4, select_per_task=2)


def _cpu(c: Config) -> None:
    """Default: 4 layers x 192 (2.4M parameters with the 4096-token embedding) on a tokenizer
    whose 1-3 digit groups are single tokens, 8 minutes of pretraining on 2 cores with Muon (the
    last 30% of the steps midtraining: conversations mixed into the text), then 4.0 minutes of
    SFT at batch 8, also with Muon. Minutes, not steps, so a faster CPU buys a better model: the
    8 minutes are planned into steps after the first 50 (~500 in fp32 on AVX2, ~800 with bf16).

    How it was chosen, by measurement on a 2-core AVX2 machine without bf16 (README, Results):
    - Muon for the blocks' matrices with AdamW at lr 1e-2 for the rest: held-out bpb after 3 equal
      minutes 2.115 (AdamW, lr 3e-3) -> 1.96 (Muon) -> 1.84-1.87 (Muon + AdamW lr 1e-2), at ~9%
      fewer steps (`python bench/pretrain_ablations.py runs/cpu --minutes 3 --only adamw,muon-lr05,baseline`,
      three runs of 3 minutes each; one seed, ~1.5% run-to-run noise on this shared machine);
    - pretraining steps are what the assistant is made of: 390 -> 560 steps took the base model's
      bpb 1.68 -> 1.57 and the SFT model's held-out accuracy 17% -> 24% (30 items per task);
      500 -> 800 steps (bf16) took bpb 1.61 -> 1.36 and the same 500-step SFT 29.6% -> 40.0%
      (+10.4 [+7.3, +13.7], 100 items per task, paired bootstrap; every task rose);
      reward models, rejection sampling and PPO, which add ~0 points, gave up minutes for it;
    - Muon in SFT as well (0.02 for the matrices, AdamW 2e-3 for the rest): 24% -> 31% on the
      same base model, and a lower bpb after SFT (1.728 -> 1.701); copying from the question
      (the operands of a calculator call) is what it learns faster;
    - the quality gate is copying from the context (bench/copy_probe.py): with single-digit
      tokens no base or SFT model copied a number from the question (calculator calls like
      "477*74" for 358 + 47); with whole-number tokens the SFT model copies the last operand
      ("What is 12 + 85?" -> "42+85") after 600 steps, the first not yet;
    - copying is learned by SFT optimizer steps, so SFT runs at batch 8 (2x the steps/minute);
    - on a machine that fits ~1,490 SFT steps in the 4 minutes, 4,000 examples per task instead of
      2,000 (each conversation seen ~0.7 times, not ~1.4) took held-out accuracy 62.1% -> 65.4%
      (+3.3 [+0.4, +6.4], 900 items; 8,000: +1.0 [-1.8, +4.2]), and 18% text rows instead of one
      row in 8 kept bits/byte after SFT within 1.15x of the base model's (1.43 -> 1.35) at -0.4
      [-3.4, +2.6] points (25%: 1.29, but -3.6 [-6.8, -0.4]);
    - 4 x 192 trains at ~5.2k tok/s in fp32 here, 4 x 256 at ~3.3k: the wider model would see
      40% fewer tokens and steps in the same minutes."""
    c.model = ModelConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=192, max_seq_len=256)
    c.tokenizer = TokenizerConfig(vocab_size=4096, single_digits=False, whole_numbers=True)
    # a minutes budget, planned into steps after the first 50 (pretrain.plan_after; see above)
    c.pretrain = PretrainConfig(batch_size=16, seq_len=256, lr=1e-2, warmup_steps=50, max_steps=3000, minutes=8.0,
                                optimizer="muon", muon_lr=0.05,
                                eval_every=250, eval_batches=20, ckpt_every=250, sample_every=0,
                                mid_fraction=0.3, mid_chat_share=0.5, eval_tasks_per_task=10)
    # alignment stages: wall-clock budgets (train.minutes) so the speedrun fits 20 minutes
    c.sft = SFTConfig(batch_size=8, seq_len=256, lr=2e-3, optimizer="muon", muon_lr=0.02, warmup_steps=20,
                      max_steps=5000, minutes=4.0, eval_every=0, ckpt_every=0, examples_per_task=4000,
                      eval_per_task=30, text_share=0.18, copy_examples=3000)
    c.rm = RMConfig(batch_size=16, lr=5e-4, warmup_steps=10, max_steps=300, minutes=0.4, eval_every=0,
                    ckpt_every=0, prompts_per_task=24, samples_per_prompt=4, heldout_per_task=15,
                    safety_prompts=96, safety_heldout=100)
    # 60 validation items per task: RL publishes a checkpoint only when it beats SFT there with p < 0.05
    c.rl = RLConfig(batch_size=16, lr=1e-4, max_steps=300, minutes=0.35, eval_every=0, ckpt_every=0, log_every=2,
                    eval_per_task=60)
    c.rejection = dataclasses.replace(c.rejection, prompts=64, group_size=4, rounds=2, steps_per_round=40)
    c.ppo = dataclasses.replace(c.ppo, prompts_per_rollout=16, ppo_epochs=2, curve_points=2, kl_sweep="")
    # GRPO on the verifier is the RL that paid from a weaker SFT model (+1.3 to +2.0 points in 0.7 min;
    # +0 to +0.8 from the 26-31% SFT models); PPO and rejection sampling against the learned RM get
    # the shorter shared rl.minutes
    c.grpo = dataclasses.replace(c.grpo, prompts_per_rollout=8, group_size=8, ppo_epochs=1, max_draws=4, minutes=0.6)
    c.eval = EvalConfig(eval_per_task=100, pass_k=4, pass_k_per_task=15, bootstrap=200)


def _gpt2_small(c: Config) -> None:
    """124M parameters, 1024 context: for GPUs. 20,000 steps of 32 x 16 x 1024 tokens are 10.5B
    tokens, 85 per parameter (Chinchilla's compute-optimal ratio is ~20; more tokens buy a cheaper
    model to serve), C = 6ND = 7.8e18 FLOPs.

    Checked against this machine's fit (`llmforge scaling plan --out RUN --flops 7.8e18` on the
    README's 13-point sweep): Approach 3 predicts 1.892 nats for this point and 1.864 for its own
    optimum (9 x 432, 20M params on 66B tokens), 1.5% apart on a flat valley; Approach 2's
    N_opt ∝ C^0.70 would say billions of parameters. Both extrapolate 5.9 orders of magnitude
    beyond budgets that span 3.3x, so neither overrides the published recipe this preset keeps."""
    c.model = ModelConfig(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768,
                          max_seq_len=1024, tie_embeddings=True)
    c.tokenizer = TokenizerConfig(vocab_size=50304, sample_bytes=200_000_000)
    c.data.shard_tokens = 100_000_000
    c.pretrain = PretrainConfig(batch_size=32, seq_len=1024, grad_accum=16, lr=6e-4, warmup_steps=700,
                             max_steps=20_000, eval_every=500, eval_batches=50, ckpt_every=1000,
                             sample_every=1000, compile=True)


def _cpu_moe(c: Config) -> None:
    """The `cpu` budget and recipe with every MLP a mixture of 8 SwiGLU experts of half the dense
    width, top-2 token choice: the same active parameters per token as `cpu` (2.4M of 6.0M).
    bench/moe_vs_dense.py measures it against `cpu` at equal minutes and FLOPs (README, Results)."""
    _cpu(c)
    c.model = dataclasses.replace(c.model, moe_experts=8, moe_top_k=2)


def _gpt2_small_moe(c: Config) -> None:
    """`gpt2-small` with a mixture of 8 experts (top 2, half the dense width each) in every other
    layer: the same active parameters per token (124M), 4x the MLP parameters in those layers."""
    _gpt2_small(c)
    c.model = dataclasses.replace(c.model, moe_experts=8, moe_top_k=2, moe_every=2)
    c.pretrain.compile = False  # the dispatch's per-expert slice sizes are data-dependent: graph breaks, recompiles


PRESETS = {"micro": _micro, "cpu": _cpu, "gpt2-small": _gpt2_small, "cpu-moe": _cpu_moe,
           "gpt2-small-moe": _gpt2_small_moe}


# ---------------------------------------------------------------- loading and overrides

def _merge(obj, values: dict, where: str, strict: bool = True) -> None:
    """Set dataclass `obj`'s fields from a nested dict, type-checking as we go."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in names and not strict:   # a run recorded by an older llmforge: the key was retired
            print(f"config: ignoring '{path}' recorded in the run's config.toml (no longer a setting)")
            continue
        if key not in names:
            raise UserError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{path}' is a section; give it as a TOML table")
            _merge(current, value, path + ".", strict)
        elif key == "sources":
            if isinstance(value, str):  # from --set data.sources=[{...}]
                value = _parse_literal(value, path)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise UserError(f"'{path}' must be a list of tables ([[data.sources]] in TOML)")
            sources = []
            for i, v in enumerate(value):
                s = SourceConfig()
                _merge(s, v, f"{path}[{i}].")
                sources.append(s)
            setattr(obj, key, sources)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _coerce(value, typ, path: str):
    if isinstance(value, str) and typ is not str:
        value = _parse_literal(value, path)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        return str(value)
    else:
        return value
    raise UserError(f"config key '{path}' wants a {typ.__name__}, got {value!r}")


def _parse_literal(text: str, path: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            return float(text)  # tomllib rejects forms like "1e-3" without a leading digit dot
        except ValueError:
            return text


def apply_override(cfg: Config, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"override '{assignment}' is not key=value; write e.g. --set pretrain.lr=1e-3")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().lstrip("-").split(".")
    nested: dict = {leaf: value}
    for p in reversed(parents):
        nested = {p: nested}
    _merge(cfg, nested, "")


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing .toml file to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None


def resolve(preset: str | None = None, config_file: str | None = None, overrides=(), run_dir=None) -> Config:
    recorded = Path(run_dir) / "config.toml" if run_dir else None
    recorded_values = load_toml(recorded) if recorded and recorded.is_file() else None
    name = preset or (recorded_values or {}).get("preset") or "cpu"
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    PRESETS[name](cfg)
    if recorded_values and preset in (None, recorded_values.get("preset")):
        _merge(cfg, recorded_values, "", strict=False)
    if config_file:
        _merge(cfg, load_toml(config_file), "")
    for o in overrides:
        apply_override(cfg, o)
    cfg.model.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Config, run_dir: str | Path) -> None:
    from llmforge.run import write_text_atomic
    write_text_atomic(Path(run_dir) / "config.toml", to_toml(cfg))
