"""End to end in TRL: SteadyGRPOTrainer on the embedded tiny-adder and the arithmetic task, on CPU.

The quickstart's recipe (src/steadyrl/configs/quickstart.yaml: GRPO advantages, ppo_clip 0.2 / 0.28, token mean,
32 prompts x 8 completions, 6 new tokens, AdamW 3e-4 with 5 warm-up steps, grad clip 1) run through TRL's
GRPOTrainer instead of steadyrl's trainer. Held-out greedy accuracy on the task's 200 eval problems (steadyrl's
own evaluation) before and after, per seed, and the mean with a t-interval across seeds.

    .venv/bin/python benchmarks/trl_arithmetic.py --seeds 0 1 2          # ~minutes per seed on 2 CPU cores
    .venv/bin/python benchmarks/trl_arithmetic.py --steps 3 --seeds 0    # smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch


def held_out_accuracy(model, tokenizer, task, *, max_new_tokens: int = 6, seed: int = 0) -> float:
    from steadyrl.evaluate import evaluate
    from steadyrl.registry import build_backend
    from steadyrl.rollout.base import SamplingParams

    was_training = model.training
    model.eval()
    metrics = evaluate(
        build_backend("hf", model, tokenizer), tokenizer, task, task.eval_prompts(),
        sampling=SamplingParams(max_new_tokens, 1.0, 1.0, 0), pass_k=1, greedy=True, seed=seed,
    )
    model.train(was_training)
    return metrics["eval/accuracy"]


def run(seed: int, steps: int = 60, prompts_per_step: int = 32, group: int = 8, out_dir: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from steadyrl.integrations.trl import SteadyGRPOTrainer, task_dataset, task_reward
    from steadyrl.tasks import ArithmeticTask
    from steadyrl.train.setup import resolve_model_path

    torch.manual_seed(seed)
    path = resolve_model_path("embedded:tiny-adder")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    task = ArithmeticTask(min_digits=1, max_digits=3)
    prompts = task.sample("train", steps * prompts_per_step, seed=seed)
    before = held_out_accuracy(model, tokenizer, task)
    args = GRPOConfig(
        output_dir=out_dir or tempfile.mkdtemp(prefix="trl-arith-"), seed=seed, max_steps=steps,
        per_device_train_batch_size=prompts_per_step * group, gradient_accumulation_steps=1, num_generations=group,
        max_completion_length=6, temperature=1.0, learning_rate=3e-4, warmup_steps=5, lr_scheduler_type="constant_with_warmup",
        max_grad_norm=1.0, bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True,
    )
    trainer = SteadyGRPOTrainer(
        model=model, reward_funcs=task_reward(task, prompts), args=args, train_dataset=task_dataset(task, prompts),
        processing_class=tokenizer,
        advantage="grpo", loss={"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28}, aggregation="token_mean",
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    after = held_out_accuracy(trainer.model, tokenizer, task)
    return {"seed": seed, "before": before, "after": after, "train_s": wall}


def _interval(values: list[float]) -> str:
    """mean ± the 95% t half-width (n - 1 degrees of freedom)."""
    t95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = t95.get(len(values) - 1, 2.0) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    opts = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [run(seed, steps=opts.steps) for seed in opts.seeds]
    print("| seed | held-out accuracy before | after | train wall time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['train_s']:.0f} |")
    gains = [r["after"] - r["before"] for r in rows]
    print(f"\naccuracy gain over {len(rows)} seed(s): {_interval(gains)} (95% t-interval); "
          f"after: {_interval([r['after'] for r in rows])}")


if __name__ == "__main__":
    main()
