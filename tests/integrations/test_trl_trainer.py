"""SteadyGRPOTrainer: one optimizer step in TRL equals one step of steadyrl's own trainer on the same batch.

Both start from the embedded tiny-adder model. TRL generates and scores a batch; the same completions,
rewards (and a synthetic sampler log-prob μ, as TRL has with vLLM) go to steadyrl's trainer through its own
update path. The optimizer is plain SGD without clipping on both sides, so the parameter update is the
gradient itself: a wrong normaliser, a wrong gradient-accumulation or multi-process scaling, or a missing
correction weight shows up in full (Adam's first step, ~lr·sign(g), would hide a scale error).

Run: .venv/bin/python -m pytest -q tests/integrations/test_trl_trainer.py
"""

from __future__ import annotations

import pytest
import torch

from extras import requires_extra
from steadyrl import registry
from steadyrl.config import ConfigError
from steadyrl.config_load import load_config
from steadyrl.tasks import ArithmeticTask
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.setup import resolve_model_path
from steadyrl.types import RolloutBatch

pytestmark = requires_extra("trl", "trl", "peft")

LR = 0.05
G = 4  # completions per prompt
MAX_NEW = 6
DTYPE = torch.float64


def steadyrl_update(trainer, scored: ScoredBatch) -> dict[str, float]:
    """Stages 2 and 3 of steadyrl's own trainer (score: π_old / π_ref; update: the optimizer steps) on a scored
    batch, with plain SGD (as TRL's optim='sgd', constant LR): the only place this test swaps a trainer part."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.optimizer = trainer.updater.optimizer = torch.optim.SGD(params, lr=LR)
    trainer.scheduler = trainer.updater.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    trainer.scorer.score(scored)
    return trainer.updater.update(scored).metrics


@pytest.fixture(scope="module")
def model_path():
    return resolve_model_path("embedded:tiny-adder")


def _trl_step(model_path, tmp_path, monkeypatch, *, per_device=8, ga=2, spg=None, iterations=1, steps=1, clip=0.0,
              **methods):
    """Run ``steps`` optimizer steps of SteadyGRPOTrainer; return (model, generation batch, rewards, trainer)."""
    import trl.trainer.grpo_trainer as grpo
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    import steadyrl.integrations.trl as steady_trl
    from steadyrl.integrations.trl import SteadyGRPOTrainer, task_dataset, task_reward

    monkeypatch.setattr(grpo, "shuffle_sequence_dict", lambda batch: batch)  # rows in generation order
    monkeypatch.setattr(steady_trl, "reads_sampler", lambda correction: False)  # μ comes from Recording, not vLLM
    torch.manual_seed(0)
    task = ArithmeticTask()
    prompts = task.sample("train", 64, seed=1)
    recorded = {}

    class Recording(SteadyGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            # μ as vLLM would return it: π_old of the sampled tokens plus a sampler mismatch
            with torch.no_grad():
                ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
                att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
                logps, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, att, out["completion_ids"].shape[1])
            noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(7)) * 0.3
            out["sampling_per_token_logps"] = (logps + noise).clamp(max=-1e-4)
            recorded["batch"] = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            recorded["rewards"] = self._steady_rewards.sum(dim=1)
            return out

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=per_device, gradient_accumulation_steps=ga,
        steps_per_generation=spg, num_iterations=iterations, num_generations=G, max_completion_length=MAX_NEW,
        max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=clip,
        weight_decay=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE)
    trainer = Recording(
        model=model, reward_funcs=task_reward(task, prompts), args=args, train_dataset=task_dataset(task, prompts),
        processing_class=AutoTokenizer.from_pretrained(model_path), **methods,
    )
    trainer.train()
    return trainer.model, recorded["batch"], recorded["rewards"], trainer


def _steadyrl_step(model_path, tmp_path, batch, rewards, *, micro, mini_batches=1, epochs=1, clip=0.0, overrides=()):
    cfg = load_config(None, [
        f"model.name_or_path={model_path}", f"rollout.group_size={G}", f"rollout.max_new_tokens={MAX_NEW}",
        f"rollout.prompts_per_step={batch['completion_ids'].shape[0] // G}", f"optim.lr={LR}", f"optim.grad_clip={clip}",
        f"optim.micro_batch_size={micro}", f"optim.mini_batches={mini_batches}", f"optim.epochs={epochs}",
        "eval.every=0", "logging.progress=false", "logging.report=false", "logging.tensorboard=false",
        "checkpoint.save_final_model=false", f"run.output_dir={tmp_path / 'steady'}", "run.device=cpu",
        *overrides,
    ])
    from transformers import AutoModelForCausalLM

    from steadyrl.train.trainer import Trainer

    trainer = Trainer(cfg, model=AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE))
    mask = batch["completion_mask"].bool()
    rollout = RolloutBatch(
        prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"].bool(), completion_ids=batch["completion_ids"],
        response_mask=mask, rollout_logprobs=batch["sampling_per_token_logps"],
        truncated=torch.zeros(mask.shape[0], dtype=torch.bool),
    )
    adv = registry.resolve("advantage", cfg.advantage)(rewards, G)
    advantages = adv.advantages[:, None].expand_as(mask) if adv.advantages.dim() == 1 else adv.advantages
    scored = ScoredBatch(rollout, rewards=rewards, advantages=torch.where(mask, advantages.to(DTYPE), 0.0),
                         sample_mask=adv.sample_mask)
    steadyrl_update(trainer, scored)
    return trainer.model


def _assert_same_update(trl_model, steady_model, start, rel=5e-5, rel_params=1e-5):
    """Two measures, over all parameters (Δθ = the SGD step = lr · gradient):

    * ‖Δθ_TRL − Δθ_steadyrl‖ / ‖Δθ_steadyrl‖ ≤ ``rel``: relative to the update, so a normaliser off by any
      factor gives ~1 here. Its floor is TRL's LM-head kernel, which accumulates log-probs and their gradient
      in float32 even for a float64 model: ~1e-6 absolute on the gradient (entropy differs by ~1e-6
      relative), ~7e-7 relative for a step of gradient norm ~1.5, ~2e-5 for CAPO's step of norm ~0.07.
    * ‖θ_TRL − θ_steadyrl‖ / ‖θ_steadyrl‖ ≤ ``rel_params``: the issue's criterion, relative to the parameters.
    """
    start_p = dict(start.named_parameters())
    steady_p = dict(steady_model.named_parameters())
    num = den = norm = 0.0
    for name, p in trl_model.named_parameters():
        d_trl = p.detach() - start_p[name].detach()
        d_ours = steady_p[name].detach() - start_p[name].detach()
        num += (d_trl - d_ours).pow(2).sum().item()
        den += d_ours.pow(2).sum().item()
        norm += steady_p[name].detach().pow(2).sum().item()
    assert den > 0, "steadyrl's step moved nothing"
    update_rel, param_rel = (num / den) ** 0.5, (num / norm) ** 0.5
    print(f"relative update difference {update_rel:.2e}, relative parameter difference {param_rel:.2e}")
    assert update_rel <= rel, f"relative update difference {update_rel:.2e} > {rel:.0e}"
    assert param_rel <= rel_params, f"relative parameter difference {param_rel:.2e} > {rel_params:.0e}"


CASES = {
    "grpo": dict(advantage="grpo", loss="ppo_clip", aggregation="seq_mean_token_mean"),
    "dr_grpo": dict(advantage="dr_grpo", loss="ppo_clip", aggregation="constant_norm"),
    "dapo_token_mean": dict(advantage="grpo", loss={"name": "ppo_clip", "clip_high": 0.28}, aggregation="token_mean"),
    "cispo": dict(advantage="grpo", loss={"name": "cispo", "clip_high": 5.0}, aggregation="token_mean"),
    "minirl_with_correction": dict(
        advantage="grpo", loss="reinforce_is", aggregation="seq_mean_token_sum",
        correction={"name": "token_mis", "ratio_min": 0.7, "ratio_max": 1.4},
    ),
    "capo": dict(advantage="grpo", loss="ppo_clip", aggregation="token_mean",
                 token_filters=[{"name": "capo", "fisher_tau": 1e-4, "hessian_tau": 1e-2}]),
}


def _overrides(methods: dict) -> list[str]:
    out = []
    for section in ("advantage", "loss", "aggregation", "correction"):
        spec = methods.get(section)
        if spec is None:
            continue
        spec = {"name": spec} if isinstance(spec, str) else spec
        out += [f"{section}.{k}={v}" for k, v in spec.items()]
    if methods.get("token_filters"):
        flat = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in f.items()) + "}" for f in methods["token_filters"])
        out.append(f"token_filters=[{flat}]")
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_steadyrls_trainer(case, model_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE)
    trl_model, batch, rewards, trainer = _trl_step(model_path, tmp_path, monkeypatch, **CASES[case])
    steady = _steadyrl_step(model_path, tmp_path, batch, rewards, micro=8, overrides=_overrides(CASES[case]))
    _assert_same_update(trl_model, steady, start)
    logged = trainer.state.log_history[0]
    if case == "capo":  # the filter did reject tokens, so the equality covers its mask
        assert logged["steadyrl/capo/rejected_frac"] > 0
    if case == "minirl_with_correction":
        assert logged["steadyrl/mismatch/masked_frac"] > 0


def test_gradient_accumulation_and_steps_per_generation_scaling(model_path, tmp_path, monkeypatch):
    """steps_per_generation = 2 × GA: one generation feeds two optimizer steps (steadyrl's mini_batches=2), with
    π_old recomputed and the step counts of each mini-batch; a micro-batch of 4 makes GA = 4 per step."""
    from transformers import AutoModelForCausalLM

    methods = dict(advantage="grpo", loss={"name": "ppo_clip", "clip_high": 0.28}, aggregation="token_mean",
                   correction={"name": "token_mis", "ratio_min": 0.7, "ratio_max": 1.4})
    start = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE)
    trl_model, batch, rewards, _ = _trl_step(model_path, tmp_path, monkeypatch, per_device=4, ga=4, spg=8, steps=2,
                                             **methods)
    steady = _steadyrl_step(model_path, tmp_path, batch, rewards, micro=4, mini_batches=2, overrides=_overrides(methods))
    _assert_same_update(trl_model, steady, start)


def test_rejections_are_renormalised_before_transformers_clips(model_path, tmp_path, monkeypatch):
    """With clipping on (norm ~1.5 > 0.5), the update equals steadyrl's only if the gradient is rescaled for the
    rejected tokens before the clip: a rescale after it would change the clipped norm by the scale (~1.2)."""
    from transformers import AutoModelForCausalLM

    methods = {**CASES["dapo_token_mean"], "correction": CASES["minirl_with_correction"]["correction"]}
    start = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE)
    trl_model, batch, rewards, trainer = _trl_step(model_path, tmp_path, monkeypatch, clip=0.5, **methods)
    steady = _steadyrl_step(model_path, tmp_path, batch, rewards, micro=8, clip=0.5, overrides=_overrides(methods))
    logged = trainer.state.log_history[0]
    assert logged["grad_norm"] > 0.5 and logged["steadyrl/normaliser_scale"] > 1.0  # both effects present
    _assert_same_update(trl_model, steady, start)


def test_token_mean_equals_trls_own_dapo_loss(model_path, tmp_path, monkeypatch):
    """Where TRL implements the method: ppo_clip + token_mean + TRL's group advantage = TRL's loss_type='dapo'
    (one generation per step, no rejected tokens: the two normalisers agree there)."""
    import trl.trainer.grpo_trainer as grpo
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from steadyrl.integrations.trl import task_dataset, task_reward

    trl_steady, _, _, _ = _trl_step(model_path, tmp_path, monkeypatch, advantage={"name": "grpo", "eps": 1e-4,
                                    "std_unbiased": True}, loss={"name": "ppo_clip", "clip_high": 0.28})
    monkeypatch.setattr(grpo, "shuffle_sequence_dict", lambda batch: batch)
    torch.manual_seed(0)
    task = ArithmeticTask()
    prompts = task.sample("train", 64, seed=1)
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl-own"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
        num_generations=G, max_completion_length=MAX_NEW, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, bf16=False, loss_type="dapo", epsilon_high=0.28, vllm_importance_sampling_correction=False,
    )
    start = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE)
    own = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE), reward_funcs=task_reward(task, prompts),
                      args=args, train_dataset=task_dataset(task, prompts),
                      processing_class=AutoTokenizer.from_pretrained(model_path))
    own.train()
    _assert_same_update(trl_steady, own.model, start, rel=1e-4)


def test_bad_method_names_fail_before_trl_loads_anything():
    from steadyrl.integrations.trl import SteadyGRPOTrainer

    with pytest.raises(ConfigError, match="valid names"):
        SteadyGRPOTrainer(model=None, loss="ppo_clipp")
    with pytest.raises(ConfigError, match="clip_hihg"):
        SteadyGRPOTrainer(model=None, loss={"name": "ppo_clip", "clip_hihg": 0.3})


def test_ignored_trl_settings_are_refused():
    from trl import GRPOConfig

    from steadyrl.integrations.trl import SteadyGRPOTrainer

    for kwargs, match in [({"entropy_coef": 0.01}, "entropy_coef"), ({"off_policy_mask_threshold": 0.5}, "opsm"),
                          ({"importance_sampling_level": "sequence"}, "gspo"),
                          ({"top_entropy_quantile": 0.2}, "high_entropy")]:
        args = GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], bf16=False, **kwargs)
        with pytest.raises(ConfigError, match=match):
            SteadyGRPOTrainer(model=None, args=args)


def test_an_estimator_that_reads_old_statistics_is_refused_before_trl_loads_anything():
    """The optimal token baseline needs Σ_v π_old(v)², which TRL's forward does not produce (status.py)."""
    from steadyrl.integrations.trl import SteadyGRPOTrainer

    refused = [n for n, e in registry.ADVANTAGES.items() if e.reads_old_statistics]
    assert refused, "no estimator reads π_old's statistics: this test checks nothing"
    for name in refused:
        with pytest.raises(ConfigError, match=f"advantage '{name}' is not carried by SteadyGRPOTrainer"):
            SteadyGRPOTrainer(model=None, advantage=name)


def test_a_correction_that_reads_the_sampler_needs_vllm_and_one_that_does_not_runs(model_path, tmp_path, monkeypatch):
    """Without vLLM TRL has no μ: token_mis is refused before TRL loads anything; the 80/20 entropy mask (a
    correction that reads π_θ's entropy only) trains, and its rejected tokens leave the normaliser."""
    from trl import GRPOConfig

    from steadyrl.integrations.trl import SteadyGRPOTrainer

    args = GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], bf16=False)
    with pytest.raises(ConfigError, match="use_vllm=True"):
        SteadyGRPOTrainer(model=None, args=args, correction="token_mis")
    _, _, _, trainer = _trl_step(model_path, tmp_path, monkeypatch, correction={"name": "high_entropy"})
    logged = trainer.state.log_history[0]
    assert logged["steadyrl/normaliser_scale"] > 1.0  # 80 % of the tokens were rejected


def test_every_registered_loss_runs_one_step(model_path, tmp_path, monkeypatch):
    """Every loss of the registry (new ones included) trains through SteadyGRPOTrainer without error."""
    for name in registry.FAMILIES["loss"].table:
        trl_model, _, _, _ = _trl_step(model_path, tmp_path / name, monkeypatch, per_device=8, ga=1, loss=name)
        assert all(torch.isfinite(p).all() for p in trl_model.parameters()), name



def test_guard_callback_rolls_back_model_optimizer_lr_and_trust_region(model_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from steadyrl.integrations.trl_guard import GuardCallback

    trl_model, _, _, trainer = _trl_step(model_path, tmp_path, monkeypatch, guard={"lr_factor": 0.5, "clip_factor": 0.5,
                                                                                    "ratio_drift": 0.0})
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GuardCallback)]
    start = dict(AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE).named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in trl_model.named_parameters())  # the step moved the model
    loss_fn = trainer.loss_fn
    logs = {"grad_norm": float("nan"), "reward": 0.5, "loss": 0.0}
    callback.on_log(trainer.args, trainer.state, None, logs=logs)
    # the snapshot taken at train begin is restored: the initial weights, LR x 0.5, ε x 0.5
    assert all(torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5)
    assert trainer.loss_fn is not loss_fn and logs["guard/rollbacks"] == 1.0
    assert trainer.loss_fn.kwargs == {"clip_low": 0.1, "clip_high": 0.1}  # ppo_clip's ε = 0.2, halved
    assert (tmp_path / "trl" / "guard.jsonl").read_text().count('"rollback"') == 1


def test_guard_needs_every_step_logged(model_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from steadyrl.integrations.trl import SteadyGRPOTrainer, task_dataset, task_reward

    task = ArithmeticTask()
    prompts = task.sample("train", 8, seed=1)
    args = GRPOConfig(output_dir=str(tmp_path), logging_steps=5, use_cpu=True, report_to=[], bf16=False,
                      per_device_train_batch_size=8, num_generations=G)
    with pytest.raises(ConfigError, match="logging_steps=1"):
        SteadyGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=task_reward(task, prompts),
                          args=args, train_dataset=task_dataset(task, prompts), guard={"max_rollbacks": 1})


def test_documented_script_runs(tmp_path, monkeypatch):
    """docs/integrations/trl.md's script, for one step instead of 60 and a smaller batch."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs/integrations/trl.md").read_text()
    script = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert len([line for line in script.splitlines() if line.strip()]) <= 16
    script = script.replace("max_steps=60", "max_steps=1").replace("per_device_train_batch_size=256",
                                                                   "per_device_train_batch_size=16")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, "trl.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1


def test_lora_adapter_trains_with_hidden_states_and_capo_is_refused(model_path, tmp_path, monkeypatch):
    """PEFT: the hidden-state hook (LCO-MSE's token logits) is found under the adapter wrapper and only LoRA weights
    move; CAPO models an update of the LM head, which LoRA freezes, so it is refused with the reason."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model, _, _, trainer = _trl_step(model_path, tmp_path, monkeypatch, peft_config=lora, loss="lco_mse")
    moved = {n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert moved and all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert "steadyrl/lco/target_prob" in trainer.state.log_history[0]
    with pytest.raises(ConfigError, match="LM head is frozen"):
        _trl_step(model_path, tmp_path / "capo", monkeypatch, peft_config=lora, token_filters=[{"name": "capo"}])
