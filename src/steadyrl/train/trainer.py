"""The RL trainer: rollout -> reward -> advantage -> [old / ref log-probs] -> update -> log -> eval -> checkpoint.

    trainer = Trainer(load_config("configs/quickstart.yaml"))
    summary = trainer.train()

One RL step is one rollout batch; it makes ``optim.mini_batches * optim.epochs`` optimizer steps. Everything
that can be validated (config keys, registry names, batch arithmetic, model path, tokenizer) is validated in
``__init__``, before the first rollout. A run directory with a checkpoint is resumed exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from steadyrl._io import atomic_write_text
from steadyrl.config import TrainConfig, dump_config
from steadyrl.models import load_model, load_tokenizer, resolve_dtype
from steadyrl.models.loading import check_tokenizer_fits_model
from steadyrl.models.routing import check_routing_replay
from steadyrl.report import MetricLogger, ProgressBar, make_report
from steadyrl.rollout import build_backend
from steadyrl.rollout.base import SamplingParams
from steadyrl.rollout.quant import check_sampler_quant
from steadyrl.tasks import build_task
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_atomic,
)
from steadyrl.train.collect import RolloutCollector, step_seed
from steadyrl.train.distributed import DistInfo, all_reduce_, barrier, init_distributed
from steadyrl.train.evaluate import evaluate
from steadyrl.train.guard import StabilityGuard
from steadyrl.train.metrics import MetricAccumulator
from steadyrl.train.retention import build_retention
from steadyrl.train.setup import (
    build_optimizer,
    resolve_device,
    resolve_methods,
    resolve_model_path,
    validate_batch_arithmetic,
    validate_run_dir,
)
from steadyrl.train.update import PolicyUpdater, UpdateSettings


class Trainer:
    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, task=None) -> None:
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.run.device if cfg.run.device != "auto" else _auto_device())
        validate_batch_arithmetic(cfg, self.info)
        validate_run_dir(cfg)
        check_sampler_quant(cfg.rollout.sampler_quant)
        self.methods = resolve_methods(cfg)
        self.device = resolve_device(cfg.run.device, self.info)
        torch.manual_seed(cfg.run.seed)
        self.task = task if task is not None else build_task(cfg.task.name, **cfg.task.kwargs)
        model_path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, pad_token=cfg.model.pad_token)
        self.model = model if model is not None else self._load_model(model_path)
        check_tokenizer_fits_model(self.tokenizer, self.model, cfg.model.name_or_path)
        self.model.to(self.device).train()
        check_routing_replay(self.model, cfg.routing_replay)
        self.ref_model = None
        if cfg.kl.coef > 0 and cfg.kl.reference == "initial":
            # Loaded from the source, not copied, so a resumed run gets the same reference.
            self.ref_model = self._load_model(model_path).to(self.device).eval().requires_grad_(False)
        settings = UpdateSettings(
            mini_batches=cfg.optim.mini_batches,
            epochs=cfg.optim.epochs,
            micro_batch_size=cfg.optim.micro_batch_size,
            grad_clip=cfg.optim.grad_clip,
            temperature=cfg.rollout.temperature,
            max_len=cfg.rollout.max_new_tokens,
            kl_coef=cfg.kl.coef,
            autocast_dtype=torch.bfloat16 if cfg.model.autocast_bf16 else None,
            routing_replay=cfg.routing_replay,
        )
        self.total_optimizer_steps = cfg.optim.steps * settings.optimizer_steps_per_batch
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.total_optimizer_steps)
        # Retention set (RetentionConfig): measured at every eval; an auxiliary SFT term when retention.coef > 0,
        # its batch seeded by the optimizer-step count, which a checkpoint restores.
        self.retention = build_retention(cfg, self.model, self.tokenizer, info=self.info, step_fn=lambda: self.scheduler.last_epoch)
        self.updater = PolicyUpdater(
            self.model,
            self.optimizer,
            self.scheduler,
            loss_fn=self.methods["loss"],
            aggregation_fn=self.methods["aggregation"],
            correction_fn=self.methods["correction"],
            kl_fn=self.methods["kl"],
            combiner=self.methods["combiner"](model=self.model, distributed=self.info.enabled),
            settings=settings,
            token_filters=[make(model=self.model, distributed=self.info.enabled) for make in self.methods["token_filters"]],
            aux_terms=self.retention.aux_terms if self.retention else None,
            distributed=self.info.enabled,
        )
        r = cfg.rollout
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
        self.backend = build_backend(
            r.backend,
            self.model,
            self.tokenizer,
            sampler_dtype=resolve_dtype(r.sampler_dtype) if r.sampler_dtype else None,
            sampler_quant=r.sampler_quant,
        )
        self.collector = RolloutCollector(
            self.backend,
            self.tokenizer,
            self.task,
            self.methods["advantage"],
            params=self.sampling,
            prompts_per_step=r.prompts_per_step,
            group_size=r.group_size,
            info=self.info,
            seed=cfg.run.seed,
            device=self.device,
            mask_truncated=r.mask_truncated,
        )
        self.run_dir = Path(cfg.run.output_dir)
        self.start_step = 0
        self.state = {"eval_start": None, "eval_start_all": None, "wall_s": 0.0}
        guard_log = self.run_dir / "guard.jsonl" if self.info.is_main else None
        self.guard = StabilityGuard(cfg.guard, log_path=guard_log) if cfg.guard is not None else None
        self._resume_or_start()
        if self.guard is not None:
            self.guard.bind(
                self.updater, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, start_step=self.start_step
            )

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
            loaded = load_checkpoint(
                ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, map_location=self.device
            )
            self.start_step = int(loaded["step"])
            extra = loaded.get("extra") or {}
            self.state.update(extra.get("trainer_state", {}))
            self.updater.skipped_steps = int(extra.get("skipped_steps", 0))
            for f, state in zip(self.updater.token_filters, extra.get("token_filters", [])):
                f.load_state_dict(state)
            if self.guard is not None:
                self.guard.load_state_dict(extra.get("guard", {}))
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
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
        progress = ProgressBar(cfg.optim.steps, enabled=cfg.logging.progress and self.info.is_main, initial=self.start_step)
        last_eval: dict[str, float] | None = None
        if self.start_step == 0 and cfg.eval.every > 0:
            last_eval = self.evaluate(step=0)
            self.state["eval_start_all"] = last_eval
            self.state["eval_start"] = _primary(last_eval)
            self.logger.log(0, last_eval)
            progress.write(_format_eval(0, last_eval))
        for step in range(self.start_step + 1, cfg.optim.steps + 1):
            metrics = self.rl_step(step)
            if self.guard is not None:
                metrics.update(self._apply_guard(step, metrics))
            self.logger.log(step, metrics)
            progress.update(step, metrics)
            final = step == cfg.optim.steps
            if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or final):
                last_eval = self.evaluate(step)
                self.logger.log(step, last_eval)
                progress.write(_format_eval(step, last_eval))
            if final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                self.state["wall_s"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save(step)
            if stop_after is not None and step >= stop_after and not final:
                progress.close()
                self.logger.close()
                return None
        progress.close()
        if last_eval is None and cfg.eval.every > 0:  # resumed after the last step
            last_eval = self.evaluate(cfg.optim.steps)
        self.state["wall_s"] += time.perf_counter() - started
        return self.finish(last_eval)

    def rl_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        collected = self.collector.collect(step)
        scored = collected.batch
        collected.metrics.update(self.prepare_logprobs(scored))
        t1 = time.perf_counter()
        metrics = self.updater.update(scored)
        t2 = time.perf_counter()
        acc = MetricAccumulator()
        acc.add(collected.metrics, scored.batch_size)
        metrics.update(acc.compute(distributed=self.info.enabled))
        tokens = all_reduce_(scored.rollout.response_mask.sum().float(), "sum").item()
        metrics["perf/step_s"] = t2 - t0
        metrics["perf/rollout_s"] = collected.rollout_s
        metrics["perf/update_s"] = t2 - t1
        metrics["perf/tokens_per_s"] = tokens / max(t2 - t0, 1e-9)
        return metrics

    def _apply_guard(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Let the stability guard see the step's metrics and snapshot / roll back; returns its guard/* metrics."""
        action = self.guard.observe(step, metrics)
        self.guard.apply(action, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, updater=self.updater)
        return self.guard.metrics()

    def prepare_logprobs(self, scored: ScoredBatch) -> dict:
        """π_old when the batch feeds more than one optimizer step (or R2 records its routing there); π_ref when
        there is a KL penalty, under the same replayed routing as the training forward. Returns routing metrics."""
        need_old = self.updater.settings.optimizer_steps_per_batch > 1 or self.cfg.kl.reference == "old"
        routing_metrics = self.updater.prepare_old_logprobs(scored, compute_old=need_old)
        if self.cfg.kl.coef > 0:
            if self.ref_model is not None:
                scored.ref_logprobs = self.updater.logprobs_no_grad(self.ref_model, scored, replay=self.updater.replay)
            else:
                scored.ref_logprobs = scored.old_logprobs
        return routing_metrics

    def evaluate(self, step: int) -> dict[str, float]:
        prompts = self.task.eval_prompts()
        if self.cfg.eval.num_prompts:
            prompts = prompts[: self.cfg.eval.num_prompts]
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
        )
        if self.retention is not None:
            metrics.update(self.retention.measure(self.backend, seed=step_seed(self.cfg.run.seed, step, 99_991)))
        return metrics

    def save(self, step: int) -> None:
        if self.info.is_main:
            extra = {
                "trainer_state": dict(self.state),
                "skipped_steps": self.updater.skipped_steps,
                "token_filters": [f.state_dict() for f in self.updater.token_filters],
            }
            if self.guard is not None:
                extra["guard"] = self.guard.state_dict()
            save_checkpoint(
                self.run_dir,
                step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra=extra,
                keep_last=self.cfg.checkpoint.keep_last,
            )
        barrier()

    def finish(self, last_eval: dict[str, float] | None) -> dict:
        summary = {
            "steps": self.cfg.optim.steps,
            "wall_s": round(self.state["wall_s"], 3),
            "eval_start": self.state["eval_start"],
            "eval_end": _primary(last_eval) if last_eval else None,
            "eval_metric": _primary_name(last_eval) if last_eval else None,
            "eval_start_all": self.state["eval_start_all"],
            "eval_end_all": last_eval,
            "skipped_steps": self.updater.skipped_steps,
            "world_size": self.info.world_size,
        }
        if self.info.is_main:
            if self.cfg.checkpoint.save_final_model:
                save_pretrained_atomic(self.model, self.tokenizer, self.run_dir / "final")
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.logger.close()
            if self.cfg.logging.report:
                make_report(self.run_dir)
        barrier()
        return summary


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _primary_name(metrics: dict[str, float]) -> str:
    return "eval/accuracy" if "eval/accuracy" in metrics else "eval/pass@1"


def _primary(metrics: dict[str, float] | None) -> float | None:
    return None if not metrics else metrics.get(_primary_name(metrics))


def _format_eval(step: int, metrics: dict[str, float]) -> str:
    parts = " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())
    return f"[eval step {step}] {parts}"
