"""Strict YAML configuration: frozen dataclasses, unknown keys are errors that list the valid ones.

A config file is a nested mapping whose sections mirror the dataclasses below. Method sections
(``advantage``, ``loss``, ``aggregation``, ``correction``) are ``{name: <registry name>, <hyper-parameter>: value}``;
their hyper-parameters are checked against the registered function's signature when the config is resolved.
Overrides from the command line use dotted keys: ``--set loss.clip_high=0.28 optim.lr=1e-4``.
This module is the schema; reading, overriding and writing a config is ``steadyrl.config_load``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration a person has to fix; the message says how."""


SamplerQuant = Literal["fp8"]
"""rollout.sampler_quant's choices (rollout/quant.py implements each)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registry name plus its hyper-parameters (bound once with functools.partial)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (steadyrl.models.lora, extra: lora): only they train; the base weights stay frozen."""

    r: int = 16
    """Rank of the update B·A."""
    alpha: float = 32.0
    """Scale: the update is (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter input in training mode; 0 keeps π_old and the training forward identical."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names to adapt (q_proj, v_proj, ...), or all-linear (every linear layer but the LM head)."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "embedded:tiny-adder"
    """Hugging Face hub id, local directory, or ``embedded:<name>`` for a checkpoint shipped inside steadyrl."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Training precision of the weights (float16 weights cannot be trained with AdamW: use ``autocast``)."""
    pad_token: str | None = None
    """Token to use for padding when the tokenizer has none (e.g. its EOS token)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2; None lets transformers choose."""
    autocast_bf16: bool = False
    """Run the training forward under bf16 autocast (GPU); master weights stay in ``dtype``. The same as
    ``autocast: bfloat16`` (kept for existing configs)."""
    autocast: Literal["none", "bfloat16", "float16"] = "none"
    """Autocast dtype of the trainer's forwards (training, π_old, π_ref); master weights stay in ``dtype``.
    float16 with fp32 weights is Precision-RL's fp16 training (arXiv 2510.26788; pair it with
    ``rollout.sampler_dtype: float16``), with dynamic loss scaling (``optim.loss_scale``)."""
    lm_head_fp32: bool = False
    """FP32 LM head (ScaleRL arXiv 2510.13786; TRL ``cast_lm_head_to_fp32``): keep the head's weights in fp32
    and compute its logits in fp32 in the sampler too (the trainer's log-prob pass always multiplies in fp32);
    see models/precision.py. No effect on an fp32 model with an fp32 sampler."""
    prompt_format: Literal["auto", "chat", "raw"] = "auto"
    """How prompts become tokens (models/chat.py): auto = the tokenizer's chat template when it has one, else the
    raw text; chat = require the template; raw = the prompt text as written. Training and eval render alike."""
    system_prompt: str | None = None
    """System message placed before every prompt rendered with the chat template."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (LoraConfig); the KL reference is then the base model with the
    adapters disabled, and the final export holds the merged model and the adapter. None = full fine-tuning."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arithmetic"
    """Registered task: arithmetic | reasoning_gym | jsonl_math | python (your reward function and data)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task's constructor (checked when the task is built)."""

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.name, dict(self.kwargs))


@dataclass(frozen=True)
class RolloutConfig:
    backend: MethodSpec = field(default_factory=lambda: MethodSpec("hf"))
    """Registered rollout backend and its options: hf (transformers generate) | native (steadyrl's static-cache
    sampler), e.g. ``{name: native, compile: true}``."""
    prompts_per_step: int = 32
    """P: prompts per RL step, summed over all ranks."""
    group_size: int = 8
    """G: completions sampled per prompt (the GRPO group)."""
    max_new_tokens: int = 8
    """Completion budget; a completion without EOS after this many tokens is truncated."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores log-probs at the same temperature."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    sampler_dtype: str | None = None
    """Sample with a copy of the policy in this dtype (e.g. bfloat16) to create a real train-inference gap."""
    sampler_quant: SamplerQuant | None = None
    """fp8: sample with a copy whose linear layers are fake-quantised to FP8 E4M3, weights re-quantised after
    every sync and activations per token (rollout/quant.py); an FP8 inference engine's gap. Combines with
    sampler_dtype (the copy's dtype) and with LoRA (the merged copy is quantised)."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens out of the loss (DAPO's overlong filtering)."""
    trainer_truncation: bool = False
    """Score π_old and π_θ on the sampler's top-k / top-p support (renormalised), so that with equal weights
    π_old/μ ≡ 1; off = the full softmax, as TRL and verl score (μ then differs from π_old on every token
    whenever top_k or top_p truncates: `steadyrl doctor` measures it)."""


@dataclass(frozen=True)
class KLConfig:
    coef: float = 0.0
    """β of the per-token KL penalty added to the loss (GRPO places it in the loss, not the reward)."""
    estimator: str = "kl_k3"
    """Registered KL estimator: kl_k1 | kl_k2 | kl_k3 | *_st (straight-through)."""
    reference: Literal["initial", "old"] = "initial"
    """initial (frozen copy of the starting policy) | old (π_old of the current rollout batch)."""


@dataclass(frozen=True)
class EntropyConfig:
    """Entropy bonus −c·H̄ in the loss (H̄ = mean per-token entropy of π_θ over the counted tokens) and
    Skywork-OR1's adaptive coefficient (arXiv 2505.22312; TRL ``entropy_coef`` / ``use_adaptive_entropy``)."""

    coef: float = 0.0
    """c; with ``adaptive`` the starting value. 0 and not adaptive = off."""
    adaptive: bool = False
    """After every optimizer step: c += delta when that step's mean entropy ≤ target, else c −= delta (clamped to
    [coef_min, coef_max]); the bonus applies only while the last measured entropy is ≤ target."""
    target: float = 0.2
    """Target mean per-token entropy in nats (TRL's default; set it near the entropy seen early in training)."""
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.coef != 0.0 or self.adaptive


@dataclass(frozen=True)
class VCPOConfig:
    """VCPO's variance controls (arXiv 2602.17616; official mit-han-lab/vcpo; stabilisers/vcpo.py). Defaults are
    the official recipe's (recipe/fully_async_policy/shell/vcpo/math/vcpo_k=10.sh)."""

    ess_scaling: bool = True
    """Scale each optimizer step's learning rate by min(1, ρ_ess/base_ess_ratio)^½ (sqrt) or ^1 (linear),
    ρ_ess = (Σw)²/(N Σw²) of the mini-batch's sequence weights w = π_old(y)/μ(y)."""
    scaling_rule: Literal["sqrt", "linear"] = "sqrt"
    base_ess_ratio: float = 1.0
    use_clipped: bool = False
    """ESS of the weights clipped at is_threshold."""
    is_threshold: float = 8.0
    """C of the clipped sequence weights min(w, C) (the recipe's rollout_is_threshold)."""
    baseline: bool = True
    """Off-policy optimal baseline: needs every trajectory's gradient norm, one extra forward and backward per
    completion (measured by benchmarks/overhead.py)."""
    scope: Literal["group", "minibatch"] = "group"
    """Baseline over each prompt's group (rewards) or over the mini-batch (the estimator's advantages)."""
    use_is_weights: bool = True
    use_clipped_is_ratios: bool = False
    normalize_by_length: bool = False
    norm_by_std: bool = True
    """Group scope: divide (R − b) by the group's reward std (the recipe's setting; the framework default is false)."""


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 100
    """RL steps (rollout batches)."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warm-up, counted in optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """constant | cosine | linear (decay to min_lr_ratio * lr after warm-up)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    mini_batches: int = 1
    """N optimizer steps per rollout batch (off-policiness); the batch is split into N mini-batches."""
    epochs: int = 1
    """Passes over the rollout batch (PPO epochs)."""
    micro_batch_size: int = 64
    """Completions per forward/backward (gradient accumulation inside a mini-batch)."""
    loss_scale: Literal["dynamic", "none"] = "dynamic"
    """Loss scaling when the trainer computes in float16 (model.autocast: float16): dynamic
    (torch.amp's defaults: 2^16, halved on overflow, doubled after 2000 finite steps) or none."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 10
    """Held-out evaluation every this many RL steps (and before the first and after the last); 0 = never."""
    num_prompts: int = 0
    """Held-out prompts used (0 = all of the task's eval split)."""
    pass_k: int = 8
    """k of pass@k (sampled at the rollout temperature); also gives pass@1 as the mean over the k samples."""
    greedy: bool = True
    """Also report greedy accuracy (eval/accuracy)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 10
    """Save every this many RL steps (and at the end), so that a killed run can resume; 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept (at least 1)."""
    save_final_model: bool = True
    """Export the final policy (HF format + tokenizer) to RUN_DIR/final."""
    hf_format: bool = True
    """Also write the policy in Hugging Face format into every checkpoint, RUN_DIR/checkpoints/step-N/hf/ (with
    LoRA the merged model there and the adapter in step-N/hf-adapter/), which ``from_pretrained`` loads while the
    run goes on, as TRL's checkpoint-N directories are; it appears and is pruned with its checkpoint (keep_last).
    Costs one more copy of the weights on disk per kept checkpoint; false = the resumable state only."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (needs `pip install wandb`)."""
    progress: bool = True
    """Per-step progress: a live bar on a terminal, a plain line per step when output goes to a file or pipe;
    false prints only the eval lines."""
    report: bool = True
    """Write PNG plots and an HTML report at the end of the run."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory (created; resumed from its latest checkpoint when it has one and resume is true)."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    resume: bool = True
    """Continue the run in output_dir from its latest checkpoint (only with the run's own config)."""
    preflight: bool = True
    """Before step 1 of a new run, check that the sampler/trainer ratio is 1 at equal weights (`steadyrl doctor`)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun --nproc_per_node N) share the work; each rank samples and trains on whole
    groups either way, and gradients are summed over ranks. ddp = every rank holds the full model, gradients and
    optimizer state (runtime/distributed.py); fsdp = FSDP2 shards parameters, gradients and AdamW state over the
    ranks, for a model whose training state does not fit one device; the samplers keep a full copy of the weights
    (train/sharded.py says what is gathered when, and what is refused: LoRA, routing replay)."""


@dataclass(frozen=True)
class RetentionConfig:
    """A retention set: a task the RL run does not train on, measured at every eval, optionally trained on."""

    task: TaskConfig = field(default_factory=lambda: TaskConfig("arithmetic", {"operations": "-"}))
    """The retention task (default: subtraction, which the embedded model learnt in warm start and RL never trains)."""
    coef: float = 0.0
    """Weight of the auxiliary SFT loss (token-mean NLL of correct demonstrations, a stability term for PCR /
    PCGrad, loss term "retention"); 0 = measure only."""
    batch_size: int = 32
    """Demonstrations per optimizer step, summed over ranks (a fresh batch every step, seeded by the step)."""
    eval_prompts: int = 200
    """Held-out retention prompts measured at every eval (retention/nll, retention/accuracy); 0 = all."""
    max_new_tokens: int = 0
    """Greedy completion budget of the retention accuracy; 0 = rollout.max_new_tokens."""


@dataclass(frozen=True)
class GuardConfig:
    """The stability guard (steadyrl.stabilisers.guard, docs/stability-lab.md): when the step diagnostics predict a
    collapse, roll back to an in-memory snapshot, cut the LR and tighten the trust region. 0 disables a signal."""

    window: int = 8
    """RL steps of history for the running medians and the entropy slope."""
    min_history: int = 4
    """Healthy steps seen before a median-based signal (grad, ESS, KL) may fire."""
    reward_window: int = 3
    """Steps averaged for the reward-drop signal."""
    reward_drop: float = 0.2
    """Fire when the reward_window mean reward falls this far (reward units) below its best so far."""
    grad_spike: float = 10.0
    """Fire when grad/norm exceeds this multiple of its running median (stable lab runs reach 7x)."""
    entropy_rise: float = 1.0
    """Fire when the entropy's fitted relative change across the window exceeds +entropy_rise ..."""
    entropy_fall: float = 0.8
    """... or falls below −entropy_fall while the reward is below its best (else it is convergence)."""
    ess_drop: float = 0.5
    """Fire when mismatch/is_ess falls below this fraction of its running median."""
    kl_spike: float = 10.0
    """Fire when mismatch/kl_k3 exceeds this multiple of its running median ..."""
    kl_min: float = 1.0e-3
    """... and this absolute value."""
    ratio_drift: float = 0.01
    """Fire when the mean sampler/trainer ratio π_old/μ (mismatch/ratio_mean, 1 in expectation) is further than
    this from 1: a ratio that is wrong on average, not just noisy."""
    snapshot_every: int = 5
    """Healthy steps between in-memory snapshots (model, optimizer, token-filter state)."""
    keep_snapshots: int = 2
    """Snapshots kept; a rollback restores the oldest (a collapse may have begun before the newest)."""
    lr_factor: float = 0.3
    """Multiply the learning rate by this on every rollback (0.3: one rollback moves a collapsing LR of the lab's
    grid, 3e-3, to where plain GRPO degrades but holds, 9e-4; a second to where it is stable)."""
    clip_factor: float = 0.5
    """Multiply the loss's trust-region widths by this on every rollback (which hyper-parameters those are is a
    fact of each loss in the registry, e.g. PPO's clip_low / clip_high); 1 leaves them."""
    cooldown: int = 5
    """Steps after a rollback in which only non-finite values / skipped steps can fire."""
    max_rollbacks: int = 3
    """After this many rollbacks the guard only logs alarms."""
    checkpoint_snapshots: bool = True
    """Save the snapshots in checkpoints, so a resumed run rolls back exactly as an uninterrupted one."""


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling layer between rollout and advantage (steadyrl.sampling, docs/methods/sampling.md): which
    prompts, which groups, which rewards.  The defaults are plain uniform sampling with nothing else."""

    selector: MethodSpec = field(default_factory=lambda: MethodSpec("uniform"))
    """Registered prompt selector: uniform (fresh draws, or a fixed pool with pool_size) | vade."""
    filters: tuple[MethodSpec, ...] = ()
    """Group filters, applied in order: dynamic_sampling (DAPO, over-samples) | iqr_entropy (M-GRPO)."""
    augmenters: tuple[MethodSpec, ...] = ()
    """Group augmenters for groups without reward variance: r3_replay | sage_hints."""
    reward_shapers: tuple[MethodSpec, ...] = ()
    """Reward shapers, applied in order: overlong_penalty (DAPO) | majority_vote (M-GRPO, label-free)."""
    advantage: MethodSpec | None = None
    """A layer advantage (dcpo | riskpo | adora | copo); when set it replaces the top-level ``advantage``."""
    store_capacity: int = 65536
    """Prompts the per-prompt store remembers (least recently seen evicted)."""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: MethodSpec = field(default_factory=lambda: MethodSpec("grpo"))
    loss: MethodSpec = field(default_factory=lambda: MethodSpec("ppo_clip"))
    aggregation: MethodSpec = field(default_factory=lambda: MethodSpec("token_mean"))
    correction: MethodSpec | None = None
    kl: KLConfig = field(default_factory=KLConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """Entropy bonus and its adaptive coefficient (Skywork-OR1); off by default."""
    vcpo: VCPOConfig | None = None
    """VCPO's ESS-scaled learning rate and off-policy optimal baseline (VCPOConfig); None = off. ``--set
    vcpo.baseline=true`` turns it on with defaults."""
    retention: RetentionConfig | None = None
    """Retention set measured at every eval and, with coef > 0, trained on as an auxiliary loss (see RetentionConfig)."""
    token_filters: tuple[MethodSpec, ...] = ()
    """Stabilisers that mask / reweight tokens from the training forward, e.g. [{name: capo, ...}]."""
    combiner: MethodSpec = field(default_factory=lambda: MethodSpec("sum"))
    """How the named loss terms become one gradient: sum | pcgrad | pcr | fixed_alpha."""
    routing_replay: Literal["none", "R2", "R3"] = "none"
    """MoE Routing Replay: none | R2 (replay the old-log-prob forward's experts) | R3 (the sampler's)."""
    routing_diagnostics: bool = True
    """On MoE models, log routing agreement and the mismatch without replay (routing/*); costs one no-grad
    forward per rollout batch unless a π_old forward without replay already runs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig | None = None
    """Stability guard (GuardConfig); None = off. `--set guard.max_rollbacks=3` turns it on with defaults."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Prompt selection, group filters / augmenters, reward shaping, stateful advantages (SamplingConfig)."""
