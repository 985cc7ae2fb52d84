"""FSDP2 on CPU: 2 processes (gloo) with run.parallel=fsdp give the same update as 1 process on the same batch,
and a whole FSDP run (rollouts from the gathered sampler copy, sharded π_ref, evaluation, checkpoints with hf/,
resume, final export) matches the same run with run.parallel=ddp.

    .venv/bin/python -m pytest -q tests/train/test_fsdp.py

As in tests/train/test_distributed.py, one ScoredBatch is collected once by a single-process trainer; the single
process updates on all of it, each FSDP rank on its half of the groups. With FSDP each rank holds half of every
parameter; the reduce-scatter sums the gradients over ranks (divide factor 1), so after the step the all-gathered
parameters equal the single-process ones to float rounding. SGD without clipping exposes any error in the
gradient's scale; the AdamW case keeps the trainer's optimizer with clipping (the clip uses the norm over both
ranks' shards). The CAPO case reads the LM head's full weight between forward and backward and takes the
penalty's gradient through it (fisher_lambda > 0), with a Hessian mask that rejects part of the tokens.
PCGrad and PCR keep their sums as shards and all-reduce partial norms: PCGrad equals the single process
exactly; PCR's sample j under FSDP is micro-batch j of both ranks together, so its reference is a single
process whose micro-batches are those unions.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sevens_task import SevensTask
from steadyrl.config import ConfigError
from steadyrl.config_load import load_config
from steadyrl.runtime.fsdp import LocalShards, full, is_sharded
from steadyrl.train.trainer import Trainer

WORLD_SIZE = 2
TIMEOUT_S = 420
CAPO = "token_filters=[{name: capo, fisher_lambda: 1.0, hessian_tau: 2.0e-3, optimizer_model: adam}]"

CASES: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (overrides, swap in SGD)
    "token_mean": (("aggregation.name=token_mean", "optim.micro_batch_size=3"), True),
    "seq_mean_token_mean_kl": (
        ("aggregation.name=seq_mean_token_mean", "kl.coef=0.1", "kl.estimator=kl_k3", "optim.micro_batch_size=3"),
        True,
    ),
    "constant_norm_tis_adamw": (
        ("aggregation.name=constant_norm", "correction.name=token_tis", "optim.micro_batch_size=2", "optim.grad_clip=0.5"),
        False,
    ),
    "capo": (("aggregation.name=seq_mean_token_mean", CAPO, "optim.micro_batch_size=4"), True),
    # untied input embeddings are an FSDP unit of their own
    "untied_embeddings": (("model.name_or_path={untied}", "optim.micro_batch_size=8"), True),
    # gradient-conflict combiners on shards: PCGrad reads only the summed gradients S. k1's gradient at π_θ = π_ref
    # is β·∇ log π (k3's is 0 there), so the stability term has a gradient to conflict with
    "pcgrad_kl": (("combiner={name: pcgrad, modules: all}", "kl.coef=0.5", "kl.estimator=kl_k1", "optim.micro_batch_size=4"), True),
    # PCR's samples under FSDP are micro-batch j of every rank together (see SINGLE below)
    "pcr_kl": (("combiner={name: pcr, modules: all}", "kl.coef=0.5", "kl.estimator=kl_k1", "optim.micro_batch_size=4"), True),
}
SINGLE = {
    # the single process takes the union of the ranks' j-th micro-batches (4 rows each) as its j-th micro-batch
    # of 8 rows: rows [0-3, 8-11] then [4-7, 12-15] of the 16 (rank 0 holds rows 0-7, rank 1 rows 8-15)
    "pcr_kl": (("optim.micro_batch_size=8",), [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]),
}
RUN = (  # the whole-loop comparison: KL to the initial model, eval every step, a checkpoint every step
    "optim.steps=2", "kl.coef=0.1", "eval.every=1", "eval.num_prompts=4", "eval.pass_k=2", "checkpoint.every=1",
    "checkpoint.save_final_model=true", "optim.micro_batch_size=4",
)


def _config(model_dir: str, out_dir: Path, overrides: tuple[str, ...]):
    overrides = tuple(o.replace("{untied}", str(Path(model_dir).parent / "untied")) for o in overrides)
    base = [
        f"model.name_or_path={model_dir}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "optim.steps=1",
        "optim.lr=1e-2",
        "optim.grad_clip=0",
        "optim.mini_batches=1",
        "eval.every=0",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
        "checkpoint.save_final_model=false",
        f"run.output_dir={out_dir}",
        "run.device=cpu",
    ]
    return load_config(None, base + list(overrides))


def _use_sgd(trainer: Trainer, lr: float = 0.5) -> None:
    updater = trainer.updater
    updater.optimizer = torch.optim.SGD(updater.params, lr=lr)
    updater.scheduler = torch.optim.lr_scheduler.LambdaLR(updater.optimizer, lambda step: 1.0)


def _update(trainer: Trainer, case: str, batch) -> tuple[dict, dict]:
    """(parameter change, metrics) of one update; sharded parameters are all-gathered (every rank calls this)."""
    if CASES[case][1]:
        _use_sgd(trainer)
    before = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.updater.update(batch).metrics
    delta = {n: full(p.detach()) - before[n] for n, p in trainer.model.named_parameters()}
    return delta, metrics


def _worker(rank: int, port: int, model_dir: str, work: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    work_dir = Path(work)
    results: dict = {}
    trainers: dict[str, Trainer] = {}
    for case, (overrides, _) in CASES.items():
        batch = torch.load(work_dir / f"{case}.batch.pt", weights_only=False)
        half = batch.batch_size // WORLD_SIZE
        local = batch.select(torch.arange(rank * half, (rank + 1) * half))
        trainer = Trainer(_config(model_dir, work_dir / f"fsdp-{case}", (*overrides, "run.parallel=fsdp")), task=SevensTask())
        results[case] = _update(trainer, case, local)
        trainers[case] = trainer
        results[f"{case}:embeddings_unit"] = is_sharded(trainer.model.get_input_embeddings())
    results["shards"] = _local_shards_round_trip(trainers["constant_norm_tis_adamw"])  # AdamW: state to restore
    results["refused"] = _refusals(model_dir, work_dir)
    for name, parallel, stop_after in (("fsdp", "fsdp", 1), ("fsdp-straight", "fsdp", None), ("ddp", "ddp", None)):
        cfg = _config(model_dir, work_dir / f"run-{name}", (*RUN, f"run.parallel={parallel}"))
        Trainer(cfg, task=SevensTask()).train(stop_after=stop_after)
        if stop_after is not None:  # resume from the step-1 checkpoint in a fresh trainer
            Trainer(cfg, task=SevensTask()).train()
    torch.save(results, work_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _local_shards_round_trip(trainer: Trainer) -> bool:
    """The guard's snapshot: each rank's shards of the model and of AdamW's state come back exactly after a step."""
    model, optimizer = LocalShards(trainer.model), LocalShards(trainer.optimizer)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer.state_dict()
    saved_opt = {**saved_opt, "state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved_opt["state"].items()}}
    assert saved_opt["state"] and all(s["exp_avg"].dim() > 0 for s in saved_opt["state"].values())
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()  # moves the weights and AdamW's moments
    changed = not all(torch.equal(v, model.state_dict()[k]) for k, v in saved_model.items())
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    restored_opt = optimizer.state_dict()["state"]
    same_opt = all(
        torch.equal(saved_opt["state"][i][key], restored_opt[i][key]) for i in saved_opt["state"] for key in ("exp_avg", "exp_avg_sq")
    )
    same_model = all(torch.equal(v, model.state_dict()[k]) for k, v in saved_model.items())
    return changed and same_model and same_opt


def _refusals(model_dir: str, work_dir: Path) -> list[str]:
    messages = []
    for overrides in (("model.lora={r: 2}",), ("guard.max_rollbacks=3",), ("routing_replay=R3",),
                      ("sampling.reward_shapers=[{name: majority_vote}]",), ("rollout.sampler_quant=fp8",)):
        try:
            Trainer(_config(model_dir, work_dir / "refused", (*overrides, "run.parallel=fsdp")), task=SevensTask())
        except ConfigError as error:
            messages.append(str(error))
    return messages


def _save_untied_model(tied_dir: str, out: Path) -> None:
    from steadyrl.models import build_tiny_model, tiny_model_config
    from steadyrl.models.loading import load_tokenizer
    from steadyrl.runtime.checkpoint import save_pretrained_atomic

    if out.is_dir():
        return
    tokenizer = load_tokenizer(tied_dir)
    config = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                               tie_word_embeddings=False)
    model = build_tiny_model(config, seed=1)
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    save_pretrained_atomic(model, tokenizer, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1, "the single-process reference must not join a group"
    work = tmp_path_factory.mktemp("fsdp")
    _save_untied_model(tiny_model_dir, Path(tiny_model_dir).parent / "untied")
    single = {}
    for case, (overrides, _) in CASES.items():
        single_overrides, rows = SINGLE.get(case, ((), None))
        trainer = Trainer(_config(tiny_model_dir, work / f"single-{case}", (*overrides, *single_overrides)), task=SevensTask())
        batch = trainer.collector.collect(1).batch
        trainer.scorer.score(batch)
        torch.save(batch, work / f"{case}.batch.pt")
        single[case] = _update(trainer, case, batch if rows is None else batch.select(torch.tensor(rows)))
        if rows is not None:  # control: the batch in its own order groups other rows into the samples
            trainer = Trainer(_config(tiny_model_dir, work / f"control-{case}", (*overrides, *single_overrides)), task=SevensTask())
            single[f"{case}:own order"] = _update(trainer, case, batch)
    context = mp.spawn(_worker, args=(_free_port(), tiny_model_dir, str(work)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT_S}s")
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return single, ranks, work


@pytest.mark.parametrize("case", list(CASES))
def test_one_fsdp_step_equals_one_single_process_step(runs, case):
    single, ranks, _ = runs
    delta_single, metrics_single = single[case]
    for rank, result in enumerate(ranks):
        delta_fsdp, metrics_fsdp = result[case]
        assert delta_single.keys() == delta_fsdp.keys()
        for name, expected in delta_single.items():
            torch.testing.assert_close(delta_fsdp[name], expected, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
            assert expected.abs().sum() > 0, f"the reference update left {name} unchanged"
        for key in ("grad/norm", "policy/loss", "policy/entropy"):
            assert metrics_fsdp[key] == pytest.approx(metrics_single[key], rel=1e-5, abs=1e-7), (rank, key)
    tied = case != "untied_embeddings"
    assert all(result[f"{case}:embeddings_unit"] is not tied for result in ranks)  # tied: inside the root unit
    if case.startswith(("pcgrad", "pcr")):
        assert metrics_single["pcr/conflict_frac"] > 0  # some blocks conflict, so the projection acts
        for result in ranks:
            for key in ("pcr/conflict_frac", "pcr/cos_pla_sta"):
                assert result[case][1][key] == pytest.approx(metrics_single[key], rel=1e-5, abs=1e-7), key
    if case == "pcr_kl":
        assert 0 < metrics_single["pcr/alpha_mean"] < 1 and metrics_single["pcr/samples"] == 2
        for result in ranks:  # J = 2 micro-batch indices, each the union of both ranks' micro-batch
            assert result[case][1]["pcr/samples"] == 2
            assert result[case][1]["pcr/alpha_mean"] == pytest.approx(metrics_single["pcr/alpha_mean"], rel=1e-4)
        other_grouping = single[f"{case}:own order"][1]["pcr/alpha_mean"]
        assert other_grouping != pytest.approx(metrics_single["pcr/alpha_mean"], rel=1e-3)  # the grouping matters
    if case == "capo":
        assert 0 < metrics_single["capo/rejected_frac"] < 1  # the mask is active, so a wrong W would show
        assert metrics_single["capo/penalty_mean"] > 0
        for result in ranks:
            assert result[case][1]["capo/rejected_frac"] == pytest.approx(metrics_single["capo/rejected_frac"], abs=1e-6)


def test_the_guards_shard_snapshots_round_trip(runs):
    _, ranks, _ = runs
    assert all(result["shards"] for result in ranks)


def test_fsdp_on_one_process_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="launch with torchrun --nproc_per_node N"):
        Trainer(tiny_config("run.parallel=fsdp"), task=SevensTask())


def test_unsupported_combinations_are_refused_with_a_reason(runs):
    _, ranks, _ = runs
    lora, guard, replay, vote, quant = ranks[0]["refused"]
    assert "model.lora with run.parallel=fsdp" in lora and "run.parallel=ddp" in lora
    assert "guard.checkpoint_snapshots=false" in guard
    assert "routing_replay with run.parallel=fsdp" in replay
    assert "majority_vote with run.parallel=fsdp" in vote
    assert "rollout.sampler_quant with run.parallel=fsdp" in quant


def test_a_whole_fsdp_run_resumes_and_matches_the_ddp_run(runs):
    """Rollouts, π_ref, eval, checkpoints and the export under FSDP: the resumed run equals the uninterrupted one
    exactly, and both equal the DDP run to float rounding (the same samples are drawn)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, _, work = runs
    final = {name: load_file(work / f"run-{name}" / "final" / "model.safetensors") for name in ("fsdp", "fsdp-straight", "ddp")}
    assert final["fsdp"].keys() == final["ddp"].keys()
    for key, value in final["ddp"].items():
        assert torch.equal(final["fsdp"][key], final["fsdp-straight"][key]), key
        torch.testing.assert_close(final["fsdp"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = {n: [r for r in _metrics(work / f"run-{n}") if "reward/mean" in r] for n in ("fsdp", "fsdp-straight", "ddp")}
    assert [r["step"] for r in rows["fsdp"]] == [1, 2]
    for fsdp_row, ddp_row in zip(rows["fsdp"], rows["ddp"]):
        for key in ("reward/mean", "rollout/len_mean", "kl/ref_k3", "grad/norm"):
            assert fsdp_row[key] == pytest.approx(ddp_row[key], rel=1e-4, abs=1e-6), key
    assert rows["fsdp"][1]["kl/ref_k3"] > 0
    step1 = work / "run-fsdp" / "checkpoints" / "step-00000001"
    saved = torch.load(step1 / "model.pt", weights_only=True)
    ddp_saved = torch.load(work / "run-ddp" / "checkpoints" / "step-00000001" / "model.pt", weights_only=True)
    assert saved.keys() <= ddp_saved.keys()  # the unsharded names, full tensors
    for key, value in saved.items():
        torch.testing.assert_close(value, ddp_saved[key], rtol=1e-4, atol=1e-5, msg=key)
    loaded = AutoModelForCausalLM.from_pretrained(step1 / "hf").state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def _metrics(run_dir: Path) -> list[dict]:
    from steadyrl.report import read_metrics

    return read_metrics(run_dir)
