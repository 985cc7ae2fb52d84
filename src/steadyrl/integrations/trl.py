"""``SteadyGRPOTrainer``: TRL's GRPOTrainer with steadyrl's methods, by the names of a steadyrl YAML.

    trainer = SteadyGRPOTrainer(
        model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset,
        advantage="dr_grpo", loss={"name": "cispo", "clip_high": 5.0}, aggregation="token_mean",
        correction={"name": "token_tis", "cap": 2.0}, token_filters=[{"name": "capo"}],
        guard={"max_rollbacks": 3},   # steadyrl's stability guard as a TrainerCallback (trl_guard.py)
    )

Each method is a registry name or a mapping ``{name: ..., <hyper-parameter>: value}``, parsed and validated by
steadyrl's own config and registry code before TRL builds anything. What changes against TRL's GRPOTrainer:

* advantages: steadyrl's estimator on the gathered rewards (TRL's weighted sum of its reward functions, NaN
  where every function returned None), per process slice as TRL slices; ``scale_rewards`` is not read.
* loss: ``_compute_loss`` runs TRL's own forward (log-probs, entropy; the final hidden state through a hook
  when CAPO or LCO-MSE/LCH needs it), then steadyrl's update-stage composition itself,
  ``steadyrl.train.update.micro_batch_terms``: correction → token filters → loss → aggregation (+ KL with
  ``beta`` as kl.coef). ``loss_type``, ``epsilon*``, ``importance_sampling_level`` and TRL's vLLM IS ratio
  are not read.
* normalisers: steadyrl's rule (docs/normalisation.md), not TRL's. The counts of an optimizer step (tokens,
  sequences) are summed over its ``gradient_accumulation_steps`` micro-batches and all processes, so
  token_mean divides by the step's real token count (TRL's dapo divides by the generation batch's count ×
  GA / steps_per_generation). A token a correction or token filter rejects leaves every normaliser, where
  TRL's masks keep rejected tokens in the denominator: each micro-batch is aggregated with the step's counts
  before rejection and, once the step's last micro-batch has run its backward (``training_step``, before
  transformers clips), the gradient is multiplied by ``normaliser_scale`` = D(before) / D(after), exactly as
  steadyrl's PolicyUpdater does. The loss is returned multiplied by the number of processes, which DDP's
  gradient mean divides out, and is not divided by gradient accumulation (``loss_is_scaled_for_ga``): Σ over
  micro-batches and ranks of the returned terms is the step's objective, as in steadyrl's trainer. So the same
  names give the same numbers in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import Tensor
from transformers import TrainerCallback

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"SteadyGRPOTrainer needs TRL ({exc}); install it with pip install 'steadyrl[trl]'.") from exc

from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.config_load import from_dict
from steadyrl.integrations.status import TRL_OLD_STATISTICS, reads_sampler
from steadyrl.ops.aggregation import global_counts
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.train.update import micro_batch_terms, normaliser_scale
from steadyrl.types import GlobalCounts, LossInputs

MethodLike = str | MethodSpec | dict[str, Any]
_NEEDS_TOKEN_LOGITS = ("lco_mse", "lco_lch")


def method_spec(value: MethodLike, where: str) -> MethodSpec:
    """A YAML method section (name, or {name, **hyper-parameters}) as steadyrl's config parses it."""
    return value if isinstance(value, MethodSpec) else from_dict(MethodSpec, value, where)


class SteadyGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose advantages and loss are steadyrl's (module docstring)."""

    def __init__(
        self,
        *args: Any,
        advantage: MethodLike = "grpo",
        loss: MethodLike = "ppo_clip",
        aggregation: MethodLike = "token_mean",
        correction: MethodLike | None = None,
        token_filters: Sequence[MethodLike] = (),
        kl: MethodLike = "kl_k3",
        max_len: int | None = None,
        guard: Any = None,
        **kwargs: Any,
    ) -> None:
        # Names and hyper-parameters are checked before TRL loads anything (steadyrl's registry does it).
        self.steady_specs = {
            "advantage": method_spec(advantage, "advantage"),
            "loss": method_spec(loss, "loss"),
            "aggregation": method_spec(aggregation, "aggregation"),
            "correction": None if correction is None else method_spec(correction, "correction"),
            "token_filters": [method_spec(f, f"token_filters[{i}]") for i, f in enumerate(token_filters)],
            "kl": method_spec(kl, "kl"),
        }
        self.advantage_fn = registry.resolve("advantage", self.steady_specs["advantage"])
        if registry.ADVANTAGES[self.advantage_fn.name].reads_old_statistics:
            raise ConfigError(f"advantage {self.advantage_fn.name!r} is not carried by SteadyGRPOTrainer: {TRL_OLD_STATISTICS}.")
        self.base_loss_fn = self.loss_fn = registry.resolve("loss", self.steady_specs["loss"])
        self.aggregation_fn = registry.resolve("aggregation", self.steady_specs["aggregation"])
        spec = self.steady_specs["correction"]
        self.correction_fn = None if spec is None else registry.resolve("correction", spec)
        for spec in self.steady_specs["token_filters"]:
            registry.check("token_filter", spec)
        self.kl_fn = registry.resolve("kl", self.steady_specs["kl"])
        if guard is not None:
            from steadyrl.integrations.trl_guard import guard_config

            guard = guard_config(guard)
        args_ = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if args_ is not None:
            _check_args(args_, self.correction_fn)
        super().__init__(*args, **kwargs)
        self.steady_max_len = float(max_len if max_len is not None else self.max_completion_length)
        unwrapped = self.accelerator.unwrap_model(self.model)
        a = self.args
        context = {"model": _base_model(unwrapped), "distributed": self.accelerator.num_processes > 1,
                   "optimizer_defaults": {"betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon,
                                          "weight_decay": a.weight_decay}}
        self.token_filters = [registry.build("token_filter", s, **context) for s in self.steady_specs["token_filters"]]
        # Rejections decided after the forward change the step's normaliser after the fact (module docstring).
        self.rejects_in_loop = self.correction_fn is not None or bool(self.token_filters)
        if self.rejects_in_loop and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "a correction or token filter removes the tokens it rejects from the step's normaliser, which "
                "SteadyGRPOTrainer applies to the gradient after the step's last backward; DeepSpeed steps the "
                "optimizer inside that backward, so run with DDP or FSDP, or drop the correction / token filter."
            )
        self._steady_rewards: Tensor | None = None
        self._step_masks: list[Tensor] = []
        self._step_objective: list[Tensor] = []
        self._step_counts: GlobalCounts | None = None
        self._step_done = False
        if self.token_filters:
            self.add_callback(_TokenFilterSteps(self.token_filters))
        if guard is not None:
            from steadyrl.integrations.trl_guard import GuardCallback

            self.add_callback(GuardCallback(self, guard))
        on_policy = self.args.steps_per_generation == self.args.gradient_accumulation_steps and self.num_iterations == 1
        if self.steady_specs["loss"].name in _NEEDS_TOKEN_LOGITS and not on_policy:
            raise ConfigError(
                f"loss {self.steady_specs['loss'].name} needs π_old's raw token logits off-policy, which TRL does not "
                "keep; use steps_per_generation = gradient_accumulation_steps and num_iterations = 1."
            )

    def set_trust_region_scale(self, scale: float) -> None:
        """Multiply the loss's trust-region widths by ``scale`` (the stability guard's lever, as the updater's)."""
        self.loss_fn = self.base_loss_fn.with_trust_region_scale(scale) if scale != 1.0 else self.base_loss_fn

    # ------------------------------------------------------------------ advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._steady_rewards = rewards_per_func  # (N_global, n_funcs), already gathered by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        per_func = self._steady_rewards
        weighted = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards = torch.where(torch.isnan(per_func).all(dim=1), torch.full_like(weighted, math.nan), weighted)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        result = self.advantage_fn(rewards, group)
        n = out["completion_ids"].shape[0]
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        out["advantages"] = result.advantages[local]
        out["steady_sample_mask"] = result.sample_mask[local]
        for key, value in result.metrics.items():
            self._metrics[mode][f"steadyrl/{key}"].append(float(value))
        return out

    # ------------------------------------------------------------------ normalisers

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            inputs = super()._prepare_inputs(generation_batch)
            self._attach_counts([inputs], group=1)
            return inputs
        fresh = self._buffered_inputs is None or self._step % (self.args.steps_per_generation * self.num_iterations) == 0
        inputs = super()._prepare_inputs(generation_batch)
        if fresh:
            self._attach_counts(self._buffered_inputs, group=self.args.gradient_accumulation_steps)
        return inputs

    def _attach_counts(self, micro_batches: list[dict], group: int) -> None:
        """Per optimizer step (``group`` consecutive micro-batches): ``global_counts`` of the token masks before
        any rejection, over the step's micro-batches and all processes; stored in every micro-batch with a flag
        on the step's last one."""
        masks = [self._token_mask(mb) for mb in micro_batches]
        for first in range(0, len(micro_batches), group):
            counts = global_counts(masks[first : first + group], self.steady_max_len, self._reduce_sum)
            for i in range(first, min(first + group, len(micro_batches))):
                micro_batches[i]["steady_counts"] = counts
                micro_batches[i]["steady_last"] = i == first + group - 1

    @staticmethod
    def _token_mask(inputs: dict) -> Tensor:
        """(B, T) bool: completion tokens (less tool output) of the samples that take part in the loss."""
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        return mask & inputs["steady_sample_mask"].bool()[:, None]

    def _loss_inputs(self, inputs: dict, logprobs: Tensor, entropy: Tensor | None = None,
                     token_logits: Tensor | None = None) -> LossInputs:
        """What steadyrl's methods read for this micro-batch; on-policy π_old (and its token logit) is π_θ detached."""
        mask = self._token_mask(inputs)
        old = inputs.get("old_per_token_logps")  # π_old exists only when the batch feeds > 1 optimizer step
        old = logprobs.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand_as(mask)
        advantages = masked_fill_zero(advantages.float(), mask)
        return LossInputs(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=advantages,
            response_mask=mask,
            rollout_logprobs=inputs.get("sampling_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps"),
            entropy=None if entropy is None else entropy.detach(),
            reduce_sum=self._reduce_sum,
            token_logits=token_logits,
            old_token_logits=None if token_logits is None else token_logits.detach(),
            token_ids=inputs["completion_ids"],
        )

    def _reduce_sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x.clone(), reduction="sum") if self.accelerator.num_processes > 1 else x

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._step_done:
            return loss
        if not self.accelerator.sync_gradients:
            raise RuntimeError(
                "SteadyGRPOTrainer's optimizer-step boundary and the Trainer's gradient accumulation disagree; "
                "keep steps_per_generation a multiple of gradient_accumulation_steps."
            )
        return loss + self._finish_step(model)

    def _finish_step(self, model) -> Tensor:
        """After the step's last backward and before clipping: rejected tokens leave the normaliser (the
        gradient times D(before)/D(after), as PolicyUpdater._renormalise), and the step's loss is logged.
        Returns what to add to the loss transformers logs for this micro-batch, so its step total is scaled too."""
        before, processes = self._step_counts, self.accelerator.num_processes
        objective = torch.stack(self._step_objective).sum()  # this process's share of the step's objective
        totals = objective.double()[None]
        if self.rejects_in_loop:  # the counts after rejection travel in the same collective as the loss
            after = global_counts(self._step_masks, before.max_len)
            totals = torch.cat([totals, torch.stack([after.num_tokens, after.num_seqs]).to(totals.device)])
        totals = self._reduce_sum(totals)
        scale = torch.ones((), dtype=torch.float64, device=totals.device)
        if self.rejects_in_loop:
            after = GlobalCounts(num_tokens=totals[1], num_seqs=totals[2], max_len=before.max_len)
            scale = normaliser_scale(self.aggregation_fn, before, after)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self._metrics["train"]["steadyrl/policy/loss"].append(float(totals[0] * scale))
        self._metrics["train"]["steadyrl/normaliser_scale"].append(float(scale))
        self._step_masks, self._step_objective, self._step_counts, self._step_done = [], [], None, False
        return ((scale - 1) * objective * processes).float().detach()

    # ------------------------------------------------------------------ the loss

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep = completion_ids.size(1)
        want_hidden = any(f.needs_hidden for f in self.token_filters) or self.steady_specs["loss"].name in _NEEDS_TOKEN_LOGITS
        with _HiddenCapture(model, self.accelerator, enabled=want_hidden) as captured:
            logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, keep, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in _MULTIMODAL_KEYS},
            )
        hidden = captured.hidden(keep) if want_hidden else None
        token_logits = None
        if self.steady_specs["loss"].name in _NEEDS_TOKEN_LOGITS:
            token_logits = _token_logits(hidden, model, self.accelerator, completion_ids, self.temperature)
        steady = self._loss_inputs(inputs, logps, entropies, token_logits)
        counts: GlobalCounts = inputs["steady_counts"]
        step = micro_batch_terms(
            steady, loss=self.loss_fn, aggregation=self.aggregation_fn, counts=counts,
            correction=self.correction_fn, token_filters=self.token_filters, hidden=hidden, lr=self._current_lr(),
            kl=self.kl_fn if self.beta > 0 else None, kl_coef=self.beta,
        )
        objective = sum(step.terms.values())
        mode = "train" if self.model.training else "eval"
        if mode == "train":  # the rescale waits for the step's last micro-batch (training_step)
            self._step_counts = counts
            self._step_masks.append(step.mask)
            self._step_objective.append(objective.detach())
            self._step_done = bool(inputs["steady_last"])
        elif self.rejects_in_loop:  # one micro-batch is the whole evaluation step
            after = global_counts(step.mask, counts.max_len, self._reduce_sum)
            objective = objective * normaliser_scale(self.aggregation_fn, counts, after).to(objective.dtype)
            self._metrics[mode]["steadyrl/policy/loss"].append(float(objective.detach()))
        loss = objective * self.accelerator.num_processes
        if self.aux_loss_enabled:  # MoE load balance, scaled as TRL scales it
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        for key, value in step.metrics.items():
            self._metrics[mode][f"steadyrl/{key}"].append(float(value))
        return loss

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0


_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _check_args(args: Any, correction: Any) -> None:
    """TRL settings that SteadyGRPOTrainer would silently ignore are errors naming the steadyrl equivalent."""
    unsupported = {
        "entropy_coef": (getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False),
                         "its loss is steadyrl's, without TRL's entropy term; set entropy_coef=0 and "
                         "use_adaptive_entropy=False (steadyrl's own trainer has the same bonus: config entropy)"),
        "top_entropy_quantile": (getattr(args, "top_entropy_quantile", 1.0) < 1.0,
                                 "use correction={'name': 'high_entropy', 'top_entropy_quantile': ...}"),
        "off_policy_mask_threshold": (getattr(args, "off_policy_mask_threshold", None) is not None,
                                      "use correction={'name': 'opsm', 'delta': ...}"),
        "importance_sampling_level": (getattr(args, "importance_sampling_level", "token") != "token",
                                      "use loss='gspo' for sequence-level ratios"),
        "delta": (getattr(args, "delta", None) is not None, "use ppo_clip's dual_clip"),
    }
    for key, (set_, fix) in unsupported.items():
        if set_:
            raise ConfigError(f"GRPOConfig.{key} is not read by SteadyGRPOTrainer; {fix}.")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False) and correction is None:
        raise ConfigError(
            "TRL's vLLM importance-sampling correction is not applied by SteadyGRPOTrainer; pass a steadyrl "
            "correction (TRL's default sequence_mask is correction={'name': 'seq_mis'}) or set "
            "vllm_importance_sampling_correction=False."
        )
    if correction is not None and not getattr(args, "use_vllm", False) and reads_sampler(correction):
        raise ConfigError(
            f"correction {correction.name!r} needs the sampler's log-probs, which TRL returns only with "
            "use_vllm=True (sampling_per_token_logps); turn vLLM on or drop the correction."
        )
    spg, ga = args.steps_per_generation or args.gradient_accumulation_steps, args.gradient_accumulation_steps
    if spg % ga:
        raise ConfigError(
            f"steps_per_generation={spg} is not a multiple of gradient_accumulation_steps={ga}: an optimizer step "
            "would mix two generation batches and its normalisers would be undefined."
        )


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate and PEFT wrappers (the one TRL's fused LM head patched)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _HiddenCapture:
    """Keeps the backbone's last hidden state (with its graph) while TRL's fused forward runs."""

    def __init__(self, model, accelerator, enabled: bool) -> None:
        self.enabled = enabled
        self.module = _base_model(accelerator.unwrap_model(model)).base_model if enabled else None
        self.chunks: list[Tensor] = []

    def __enter__(self):
        if self.enabled:
            self.handle = self.module.register_forward_hook(lambda _m, _a, out: self.chunks.append(out.last_hidden_state))
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.handle.remove()

    def hidden(self, keep: int) -> Tensor:
        """(B, T, H): hidden[t] predicts completion token t, as the log-probs TRL keeps (``[:, -keep:]``)."""
        return torch.cat([h[:, -keep - 1 : -1] for h in self.chunks], dim=0)


def _token_logits(hidden: Tensor, model, accelerator, completion_ids: Tensor, temperature: float) -> Tensor:
    """(B, T) logit of the sampled token, z_t[y_t] / temperature (steadyrl's forward divides before gathering)."""
    head = _base_model(accelerator.unwrap_model(model)).get_output_embeddings()
    rows = head.weight[completion_ids]  # (B, T, H)
    logits = (hidden.to(rows.dtype) * rows).sum(-1)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[completion_ids]
    return logits / temperature


class _TokenFilterSteps(TrainerCallback):
    """Token filters with state (CAPO's optimizer model) are told when an optimizer step has been taken."""

    def __init__(self, token_filters) -> None:
        self.token_filters = token_filters

    def on_step_end(self, args, state, control, **kwargs):
        for f in self.token_filters:
            f.after_step()


def task_dataset(task, prompts):
    """A ``datasets.Dataset`` of a steadyrl task's prompts (columns ``prompt`` and ``prompt_id``)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p.text for p in prompts], "prompt_id": [p.id for p in prompts]})


def task_reward(task, prompts):
    """A TRL reward function scoring completions with ``task.reward`` (None → NaN, as steadyrl scores them)."""
    by_id = {p.id: p for p in prompts}

    def reward(prompts, completions, prompt_id, **kwargs):  # noqa: ARG001 -- TRL's reward-function signature
        from steadyrl.tasks.base import score_completions

        return score_completions(task, [by_id[i] for i in prompt_id], list(completions)).tolist()

    reward.__name__ = f"{getattr(task, 'name', 'task')}_reward"
    return reward
