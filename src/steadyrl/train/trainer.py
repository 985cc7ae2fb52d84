"""The RL trainer. One step is three stages, then bookkeeping:

    batch   = collector.collect(step)     prompts → rollout → reward → advantage              (train/collect.py)
                                          (which prompts / groups / rewards: the sampling layer, sampling/)
    scorer.score(batch)                   π_old, π_ref, MoE routing record, at θ_old          (train/score.py)
    updater.update(batch)                 mini-batches × micro-batches → optimizer steps      (train/update.py)
    → log, stability guard, eval, checkpoint

    trainer = Trainer(load_config("configs/quickstart.yaml"))
    summary = trainer.train()

Everything that can be validated (config keys and values, registry names, batch arithmetic, model path,
tokenizer) is validated in ``__init__``, before the first rollout. A run directory with a checkpoint is
resumed exactly. ``training_state()`` lists what a checkpoint restores besides the run's progress; a guard
rollback restores the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from steadyrl import registry
from steadyrl._io import atomic_write_text
from steadyrl.config import ConfigError, TrainConfig
from steadyrl.config_load import dump_config
from steadyrl.evaluate import evaluate
from steadyrl.models import load_model, load_tokenizer, resolve_dtype
from steadyrl.models.chat import renderer_for
from steadyrl.models.export import hf_checkpoint_writers, with_state_dict
from steadyrl.models.loading import check_tokenizer_fits_model
from steadyrl.models.lora import (
    AdapterState,
    LoraError,
    apply_lora,
    export_adapter,
    export_merged,
    is_peft_model,
)
from steadyrl.models.precision import DynamicLossScale, cast_lm_head_to_fp32
from steadyrl.models.routing import check_routing_replay, supported_moe_layers
from steadyrl.report import MetricLogger, ProgressBar, make_report, read_metrics
from steadyrl.rollout.base import SamplingParams
from steadyrl.runtime import rundir
from steadyrl.runtime.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_atomic,
)
from steadyrl.runtime.distributed import DistInfo, all_reduce_, barrier, init_distributed
from steadyrl.runtime.fsdp import full_model_state_dict
from steadyrl.runtime.metrics import MetricAccumulator
from steadyrl.runtime.seeding import step_seed
from steadyrl.sampling.layer import build_sampling_layer
from steadyrl.stabilisers.entropy import EntropyBonus
from steadyrl.stabilisers.guard import StabilityGuard
from steadyrl.stabilisers.retention import build_retention
from steadyrl.stabilisers.vcpo import VCPO
from steadyrl.train.collect import RolloutCollector
from steadyrl.train.doctor import check_ratios
from steadyrl.train.score import Scorer, ScoreSettings
from steadyrl.train.setup import (
    autocast_dtype,
    build_optimizer,
    checkpoint_extra,
    computes_in_float16,
    resolve_device,
    resolve_methods,
    resolve_model_path,
    validate_batch_arithmetic,
    validate_precision,
    validate_reward_components,
    validate_run_dir,
)
from steadyrl.train.sharded import ShardedPolicy, check_fsdp
from steadyrl.train.update import PolicyUpdater, UpdateSettings
from steadyrl.train.watch import RunWatch, TrainingFailed, print_warnings

_OWN_FILES = ("model", "optimizer", "scheduler")
"""Training state with a file of its own in a checkpoint; the rest goes into its state.pt."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, task=None) -> None:
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.run.device if cfg.run.device != "auto" else _auto_device())
        validate_batch_arithmetic(cfg, self.info)
        validate_precision(cfg)
        validate_run_dir(cfg)
        check_fsdp(cfg, self.info)
        self.methods = resolve_methods(cfg)
        autocast = autocast_dtype(cfg)
        entropy_bonus = EntropyBonus(cfg.entropy) if cfg.entropy.enabled else None  # checks its settings
        rows_per_step = cfg.rollout.prompts_per_step // self.info.world_size * cfg.rollout.group_size // cfg.optim.mini_batches
        vcpo = VCPO(cfg.vcpo, group_size=cfg.rollout.group_size, rows_per_step=rows_per_step) if cfg.vcpo else None
        self.device = resolve_device(cfg.run.device, self.info)
        torch.manual_seed(cfg.run.seed)
        self.task = task if task is not None else registry.build_task(cfg.task.spec)
        validate_reward_components(cfg, self.task)
        model_path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, pad_token=cfg.model.pad_token)
        self.renderer = renderer_for(cfg.model, self.tokenizer)  # chat template or raw, the same in training and eval
        self.model = model if model is not None else self._load_model(model_path)
        if cfg.model.lm_head_fp32:  # before a LoRA wrapper, as TRL
            cast_lm_head_to_fp32(self.model)
        self.lora = cfg.model.lora is not None
        if self.lora and not is_peft_model(self.model):
            try:  # only the adapters train; the base weights stay frozen (models/lora.py)
                self.model = apply_lora(self.model, cfg.model.lora)
            except LoraError as error:
                raise ConfigError(str(error)) from error
        check_tokenizer_fits_model(self.tokenizer, self.model, cfg.model.name_or_path)
        self.model.to(self.device).train()
        check_routing_replay(self.model, cfg.routing_replay)
        kl_on = cfg.kl.coef > 0
        ref_model = None
        if kl_on and cfg.kl.reference == "initial" and not self.lora:  # LoRA: the base model is the reference
            # Loaded from the source, not copied, so a resumed run gets the same reference.
            ref_model = self._load_model(model_path).to(self.device).eval().requires_grad_(False)
            if cfg.model.lm_head_fp32:
                cast_lm_head_to_fp32(ref_model)
        o, r = cfg.optim, cfg.rollout
        sampler_dtype = resolve_dtype(r.sampler_dtype) if r.sampler_dtype else None
        # FSDP: a full sampler copy is kept, then the policy (and reference) are sharded in place (train/sharded.py)
        self.sharded = ShardedPolicy(self.model, ref_model, sampler_dtype=sampler_dtype) if cfg.run.parallel == "fsdp" else None
        settings = UpdateSettings(
            mini_batches=o.mini_batches, epochs=o.epochs, micro_batch_size=o.micro_batch_size, grad_clip=o.grad_clip,
            temperature=r.temperature, max_len=r.max_new_tokens, kl_coef=cfg.kl.coef, autocast_dtype=autocast,
            routing_replay=cfg.routing_replay, support=_support(r),
        )
        self.total_optimizer_steps = o.steps * settings.optimizer_steps_per_batch
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.total_optimizer_steps)
        # Retention set: measured at every eval; an auxiliary SFT term when retention.coef > 0, its batch seeded
        # by the optimizer-step count, which a checkpoint restores.
        retention_task = registry.build_task(cfg.retention.task.spec) if cfg.retention else None
        self.retention = build_retention(
            cfg, self.model, self.tokenizer, retention_task, info=self.info, step_fn=lambda: self.scheduler.last_epoch
        )
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
        self.backend = (self.sharded.backend(r.backend, self.tokenizer) if self.sharded else  # FSDP: a full copy
                        registry.build_backend(r.backend, self.model, self.tokenizer, sampler_dtype=sampler_dtype,
                                               sampler_quant=r.sampler_quant))
        layer = build_sampling_layer(cfg, task=self.task, tokenizer=self.tokenizer, model=self.model, info=self.info,
                                     device=self.device)
        self.collector = RolloutCollector(
            self.backend, self.tokenizer, self.task, self.methods["advantage"], params=self.sampling,
            prompts_per_step=r.prompts_per_step, group_size=r.group_size, info=self.info, seed=cfg.run.seed,
            device=self.device, mask_truncated=r.mask_truncated, renderer=self.renderer, layer=layer,
        )
        token_advantage = self.methods["advantage"].entry.reads_old_statistics  # computed after π_old
        self.scorer = Scorer(self.model, ref_model, ScoreSettings(
            temperature=r.temperature, micro_batch_size=o.micro_batch_size, autocast_dtype=autocast,
            routing_replay=cfg.routing_replay,
            need_old=settings.optimizer_steps_per_batch > 1 or (kl_on and cfg.kl.reference == "old") or vcpo is not None,
            kl_to=cfg.kl.reference if kl_on else None,
            routing_diagnostics=cfg.routing_diagnostics and bool(supported_moe_layers(self.model, strict=False)),
            group_size=r.group_size,
            support=_support(r),
        ), advantage=self.methods["advantage"] if token_advantage else None)
        context = {"model": self.model, "distributed": self.info.enabled,
                   "optimizer_defaults": {"betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}}
        self.updater = PolicyUpdater(
            self.model, self.optimizer, self.scheduler,
            loss=self.methods["loss"], aggregation=self.methods["aggregation"], correction=self.methods["correction"],
            kl=self.methods["kl"], settings=settings,  # under FSDP the reduce-scatter has summed the gradients already
            combiner=registry.build("combiner", cfg.combiner, **{**context, "distributed": self.info.enabled and not self.sharded}),
            token_filters=[registry.build("token_filter", spec, **context) for spec in cfg.token_filters],
            aux_terms=self.retention.aux_terms if self.retention else (), distributed=self.info.enabled,
            entropy_bonus=entropy_bonus,
            loss_scale=DynamicLossScale() if computes_in_float16(cfg) and o.loss_scale == "dynamic" else None,
            vcpo=vcpo,
        )
        self.run_dir = Path(cfg.run.output_dir)
        self.start_step = 0
        self.progress: dict[str, Any] = {"skipped_steps": 0, "eval_start": None, "eval_start_all": None, "wall_s": 0.0}
        """The run's record (never rewound by a rollback): skipped optimizer steps, first eval, wall time."""
        guard_log = self.run_dir / "guard.jsonl" if self.info.is_main else None
        self.guard = StabilityGuard(cfg.guard, log_path=guard_log) if cfg.guard is not None else None
        self.watch = RunWatch()
        self._resume_or_start()
        if self.guard is not None:
            self.guard.bind(self.training_state(), start_step=self.start_step)

    def training_state(self) -> dict[str, Any]:
        """Everything a checkpoint restores besides the run's progress, each with state_dict / load_state_dict;
        the stability guard's rollback restores exactly this (the sampling layer's per-prompt state included:
        see sampling/layer.py for why a rollback rewinds it)."""
        model = AdapterState(self.model) if self.lora else self.model  # LoRA: the adapters; the base is the source
        state = {"model": model, "optimizer": self.optimizer, "scheduler": self.scheduler, "updater": self.updater,
                 "sampling": self.collector.layer}
        return {**state, **self.sharded.training_state(self.optimizer)} if self.sharded else state  # FSDP: own shards

    # ------------------------------------------------------------------ setup helpers

    def _load_model(self, path: str):
        m = self.cfg.model
        return load_model(
            path,
            dtype=m.dtype,
            device=self.device,
            gradient_checkpointing=m.gradient_checkpointing,
            attn_implementation=m.attn_implementation,
        )

    def _resume_or_start(self) -> None:
        ckpt = latest_checkpoint(self.run_dir) if self.cfg.run.resume else None
        if ckpt is not None:
            state = self.training_state()
            own = {k: state[k] for k in _OWN_FILES}
            if self.sharded:  # the full state of the files, each rank keeping its shards
                own.update(self.sharded.checkpoint_state(self.optimizer, gather=False))
            loaded = load_checkpoint(ckpt, **own, map_location="cpu" if self.sharded else self.device)
            self.start_step = int(loaded["step"])
            extra = checkpoint_extra(loaded.get("extra") or {})
            for name, obj in state.items():
                if name not in _OWN_FILES:
                    obj.load_state_dict(extra.get(name, {}))
            self.progress.update(extra.get("progress", {}))
            self.watch.load_state_dict(extra.get("watch", {}))
            if self.guard is not None:
                self.guard.load_state_dict(extra.get("guard", {}))
        if self.info.is_main:
            rundir.claim(self.run_dir)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            if ckpt is not None:
                print(f"resuming {self.run_dir} from step {self.start_step} (of {self.cfg.optim.steps})", flush=True)
        barrier()
        self.logger = MetricLogger(
            self.run_dir,
            tensorboard=self.cfg.logging.tensorboard,
            wandb={"project": self.cfg.logging.wandb_project} if self.cfg.logging.wandb_project else None,
            enabled=self.info.is_main,
            # No checkpoint: the run starts at step 0, so rows of an earlier attempt that crashed before its
            # first checkpoint are dropped instead of mixed with the new ones.
            resume_step=self.start_step if ckpt is not None else -1,
        )

    # ------------------------------------------------------------------ the loop

    def train(self, stop_after: int | None = None) -> dict | None:
        """Run to ``optim.steps``; ``stop_after`` ends this invocation early after that step (as a crash would,
        but after the step's checkpoint if one was due) and returns None."""
        cfg = self.cfg
        started = time.perf_counter()
        progress = ProgressBar(cfg.optim.steps, enabled=self.info.is_main, steps=cfg.logging.progress, initial=self.start_step)
        last_eval: dict[str, float] | None = None
        if self.start_step == 0 and cfg.run.preflight:
            for line in self.preflight():
                progress.write(line)
        if self.start_step == 0 and cfg.eval.every > 0:
            last_eval = self.evaluate(step=0)
            self.progress["eval_start_all"] = last_eval
            self.progress["eval_start"] = _primary(last_eval)
            self.logger.log(0, last_eval)
            progress.write(_format_eval(0, last_eval))
        for step in range(self.start_step + 1, cfg.optim.steps + 1):
            metrics = self.rl_step(step)
            action = self.guard.observe(step, metrics) if self.guard is not None else None
            if action is not None:
                self.guard.apply(action)
                metrics.update(self.guard.metrics())
            self.logger.log(step, metrics)
            for line in self.watch.observe(step, metrics, action):  # skipped steps, rollbacks, alarms
                progress.write(line)
            if metrics.get("train/nonfinite_weights_max", 0.0) > 0 and getattr(action, "kind", None) != "rollback":
                progress.close()
                self.logger.close()
                raise TrainingFailed(self._nonfinite_weights_message(step))
            progress.update(step, metrics)
            final = step == cfg.optim.steps
            if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or final):
                last_eval = self.evaluate(step)
                self.logger.log(step, last_eval)
                progress.write(_format_eval(step, last_eval))
            if final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                self.progress["wall_s"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save(step)
            if stop_after is not None and step >= stop_after and not final:
                progress.close()
                self.logger.close()
                return None
        progress.close()
        if last_eval is None and cfg.eval.every > 0:  # resumed after the last step
            last_eval = self.evaluate(cfg.optim.steps)
        self.progress["wall_s"] += time.perf_counter() - started
        return self.finish(last_eval)

    def rl_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        collected = self.collector.collect(step)  # 1. prompts → rollout → reward → advantage
        batch = collected.batch
        batch.policy_version = torch.full((batch.batch_size,), self.scheduler.last_epoch, device=self.device)
        score_metrics = self.scorer.score(batch)  # 2. π_old, π_ref, MoE routing, at θ_old
        scored = time.perf_counter()
        update = self.updater.update(batch)  # 3. mini-batches × micro-batches → optimizer steps
        self.progress["skipped_steps"] += update.skipped_steps
        return self._step_metrics(collected, score_metrics, update.metrics, start, scored)

    def _step_metrics(self, collected, score_metrics, update_metrics, start: float, scored: float) -> dict[str, float]:
        acc = MetricAccumulator()
        acc.add({**collected.metrics, **score_metrics}, collected.batch.batch_size)
        metrics = {**update_metrics, **acc.compute(distributed=self.info.enabled)}
        tokens = all_reduce_(collected.batch.rollout.response_mask.sum().float(), "sum").item()
        elapsed = time.perf_counter() - start
        metrics["train/skipped_steps"] = float(self.progress["skipped_steps"])
        metrics["perf/step_s"] = elapsed
        metrics["perf/rollout_s"] = collected.rollout_s
        metrics["perf/update_s"] = time.perf_counter() - scored
        metrics["perf/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        return metrics

    def preflight(self) -> list[str]:
        """The step-0 ratio check (train/doctor.py): lines naming the bias and its causes, none when the ratio is 1."""
        report = check_ratios(self)
        if report.ok:
            return []  # quiet when the ratio is 1: `steadyrl doctor` prints the numbers
        self.watch.warnings += report.lines()
        return report.lines() if self.info.is_main else []

    def _nonfinite_weights_message(self, step: int) -> str:
        last = latest_checkpoint(self.run_dir)
        resume = f"the last checkpoint is {last.name}" if last is not None else "there is no checkpoint yet"
        return (
            f"step {step}: an optimizer step made the weights non-finite (optim.lr={self.cfg.optim.lr}); lower "
            "optim.lr, set optim.grad_clip, or turn on the stability guard (--set guard.max_rollbacks=3) to roll "
            f"back instead; {resume}"
        )

    def evaluate(self, step: int) -> dict[str, float]:
        prompts = self.task.eval_prompts()
        if self.cfg.eval.num_prompts:
            prompts = prompts[: self.cfg.eval.num_prompts]
        self.backend.sync_weights()  # a separate sampler copy is refreshed only before rollouts: score today's policy
        metrics = evaluate(
            self.backend,
            self.tokenizer,
            self.task,
            prompts,
            sampling=self.sampling,
            pass_k=self.cfg.eval.pass_k,
            greedy=self.cfg.eval.greedy,
            seed=step_seed(self.cfg.run.seed, step, 99_991),
            info=self.info,
            device=self.device,
            renderer=self.renderer,
            on_samples=lambda samples: self.logger.log_samples(step, samples),  # RUN_DIR/samples.jsonl
        )
        if self.retention is not None:
            metrics.update(self.retention.measure(self.backend, seed=step_seed(self.cfg.run.seed, step, 99_991)))
        return metrics

    def save(self, step: int) -> None:
        full = self.sharded.checkpoint_state(self.optimizer, gather=True) if self.sharded else {}  # every rank
        if self.info.is_main:
            state = {**self.training_state(), **full}
            extra = {name: obj.state_dict() for name, obj in state.items() if name not in _OWN_FILES}
            extra["progress"] = dict(self.progress)
            extra["watch"] = self.watch.state_dict()
            if self.guard is not None:
                extra["guard"] = self.guard.state_dict()
            weights = full["model"].state_dict() if full else None
            exports = hf_checkpoint_writers(self.model, self.tokenizer, state_dict=weights) if self.cfg.checkpoint.hf_format else None
            save_checkpoint(
                self.run_dir, step, **{k: state[k] for k in _OWN_FILES}, extra=extra,
                keep_last=self.cfg.checkpoint.keep_last, exports=exports,  # step-N/hf: from_pretrained loads it
            )
        barrier()

    def finish(self, last_eval: dict[str, float] | None) -> dict:
        summary = {
            "steps": self.cfg.optim.steps,
            "wall_s": round(self.progress["wall_s"], 3),
            "eval_start": self.progress["eval_start"],
            "eval_end": _primary(last_eval) if last_eval else None,
            "eval_metric": _primary_name(last_eval) if last_eval else None,
            "eval_start_all": self.progress["eval_start_all"],
            "eval_end_all": last_eval,
            "skipped_steps": self.progress["skipped_steps"],
            "world_size": self.info.world_size,
        }
        gather = self.sharded and self.cfg.checkpoint.save_final_model
        weights = full_model_state_dict(self.model) if gather else None  # FSDP: every rank takes part
        if self.info.is_main:
            self.logger.flush()
            verdict = self.watch.verdict(read_metrics(self.run_dir), self.cfg.optim.steps)
            summary.update(verdict=verdict, warnings=list(self.watch.warnings))
            failed = verdict["collapsed"] or verdict["unscorable"]
            if self.cfg.checkpoint.save_final_model and self.lora and not failed:
                export_merged(self.model, self.tokenizer, self.run_dir / "final")  # loads without peft
                export_adapter(self.model, self.tokenizer, self.run_dir / "final-adapter")
            elif self.cfg.checkpoint.save_final_model and not failed:
                save_pretrained_atomic(with_state_dict(self.model, weights), self.tokenizer, self.run_dir / "final")
            print_warnings(summary, exported=self.cfg.checkpoint.save_final_model and not failed)
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.logger.close()
            if self.cfg.logging.report:
                make_report(self.run_dir)
        barrier()
        return summary


def _support(r) -> tuple[int, float]:
    """The sampler's (top_k, top_p) when the trainer replays its truncation, else the full vocabulary."""
    return (r.top_k, r.top_p) if r.trainer_truncation else (0, 1.0)


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _primary_name(metrics: dict[str, float]) -> str:
    return "eval/accuracy" if "eval/accuracy" in metrics else "eval/pass@1"


def _primary(metrics: dict[str, float] | None) -> float | None:
    return None if not metrics else metrics.get(_primary_name(metrics))


def _format_eval(step: int, metrics: dict[str, float]) -> str:
    parts = " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())
    return f"[eval step {step}] {parts}"
