"""Gradient-conflict combiners: PCR (arXiv 2602.06453, methods.md §2) and its deterministic baselines.

The updater hands every micro-batch's named loss terms to ``backward``. The **plasticity** term is
``terms["policy"]`` (the RL surrogate); the **stability** term is the sum of all the others (``"kl"``, the
KL penalty to π_ref; ``"retention"``, the SFT loss of ``steadyrl.stabilisers.retention``). Their gradients are
kept apart on the *tracked* parameter blocks and streamed into per-block statistics; ``finalize`` turns
them into one gradient per block. Untracked parameters take the plain sum g_pla + g_sta.

Per optimizer step, with samples j = 1..J (one sample = one micro-batch; [INF] set
``optim.micro_batch_size = rollout.group_size`` so that one sample is one GRPO group, methods.md §2
"Implementable reading"), and per tracked block m:

    S_pla[m] = Σ_j g_pla,j[m]    Q_pla[m] = Σ_j ‖g_pla,j[m]‖²      (same for sta)
    σ²[m]    = (Q[m] − ‖S[m]‖²/J) / (J − 1)                         (trace of the sample covariance)
    α[m]     = σ²_pla / (σ²_pla + σ²_sta + ε)                       (pcr; a constant for fixed_alpha)
    κ[m]     = α · min(⟨S_pla, S_sta⟩, 0) / ‖S_sta‖²                (= the same ratio of the means μ = S/J)
    grad[m]  = J · (μ_pla − κ μ_sta + μ_sta) = S_pla + (1 − κ) · S_sta        (add_stability=True)
            or S_pla − κ · S_sta                                               (add_stability=False)

J·(…) keeps the scale of the plain sum: with no conflict, grad = S_pla + S_sta is exactly what the ``sum``
combiner produces, because each micro-batch term is already normalised by global counts. With data
parallelism S, Q and J are summed over ranks first, so α and the projection use every sample and every
rank writes the same gradient. With FSDP (run.parallel=fsdp) each backward's gradient is summed over ranks by
the reduce-scatter before the combiner sees it, so a sample j is micro-batch j of *every* rank together [INF]
(J = micro-batches per rank); each rank holds shards of S, and the squared norms and inner products are partial
sums over the shards, all-reduced. PCGrad and fixed_alpha, which read only S, give exactly the data-parallel
gradient; PCR's σ² is taken over those cross-rank samples (tests/train/test_fsdp.py).

Blocks [INF]: a parameter's block is the module that owns it directly (``model.layers.3.mlp.up_proj`` for
``model.layers.3.mlp.up_proj.weight``; its weight and bias form one block). With LoRA (model.lora) the block is
the adapted layer: ``up_proj.lora_A`` and ``up_proj.lora_B`` together, the two factors of that layer's update
[INF: the paper trains every weight]. ``modules="mlp"`` tracks the
blocks inside an MLP / feed-forward module (a path component in ``MLP_MODULE_NAMES``), the paper's MLP-only
hybrid (§4.5); ``modules="all"`` tracks every parameter. ``blocks="global"`` merges all tracked blocks into
one (classic PCGrad over the whole shared gradient).

Cost: two backward passes per micro-batch (plasticity with ``retain_graph``, then stability); memory on the
tracked blocks: the fp32 stability sum S_sta (one extra gradient-sized buffer), the plasticity sum S_pla
(which replaces the ordinary .grad and becomes it), and the transient gradient of the current backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from steadyrl.config import ConfigError
from steadyrl.models.lora import adapted_module_name
from steadyrl.ops.gradients import blockwise_inner, conflict_coefficient, pcr_alpha, trace_variance_from_norms
from steadyrl.runtime.distributed import all_reduce_gradients, all_reduce_sum
from steadyrl.runtime.fsdp import as_shard_of, local
from steadyrl.stabilisers.combiners import GradientCombiner
from steadyrl.types import Metrics

MLP_MODULE_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
"""A module path component that marks an MLP block (Llama/Qwen/GPT-2 ``mlp``, Mixtral ``block_sparse_moe``, ...)."""


class ParameterBlocks:
    """Tracked parameters with the block each belongs to, and the untracked rest."""

    def __init__(self, model: torch.nn.Module | None, params: list[torch.nn.Parameter], modules: str, blocks: str):
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        if model is None and modules != "all":
            raise ConfigError(f"modules={modules!r} needs the model to find its modules; use modules=all.")
        owners: list[str | None] = []
        for i, p in enumerate(params):
            name = names.get(id(p), f"param{i}")
            owner = adapted_module_name(name.rpartition(".")[0] or name)
            tracked = modules == "all" or any(part in MLP_MODULE_NAMES for part in owner.split("."))
            owners.append(owner if tracked else None)
        self.tracked = [p for p, o in zip(params, owners) if o is not None]
        self.untracked = [p for p, o in zip(params, owners) if o is None]
        if not self.tracked:
            raise ConfigError(
                f"no parameter lies in an MLP module (path component in {list(MLP_MODULE_NAMES)}); "
                "set the combiner's modules=all."
            )
        tracked_owners = [o for o in owners if o is not None]
        self.names = ["all"] if blocks == "global" else list(dict.fromkeys(tracked_owners))
        position = {n: k for k, n in enumerate(self.names)}
        index = [0 if blocks == "global" else position[o] for o in tracked_owners]
        device = self.tracked[0].device
        self.block_index = torch.tensor(index, dtype=torch.long, device=device)  # (N,)
        self.dtype = torch.float32
        for p in self.tracked:
            self.dtype = torch.promote_types(self.dtype, p.dtype)  # fp32 sums for bf16 weights, fp64 kept

    @property
    def num_blocks(self) -> int:
        return len(self.names)


class ConflictCombiner(GradientCombiner):
    """Streams per-block plasticity / stability sums; subclasses say how the two sums become one gradient."""

    needs_variance = False
    separable_aux = False  # a sample is one micro-batch's (policy, stability) pair

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        distributed: bool = False,
        modules: str = "mlp",
        blocks: str = "module",
    ) -> None:
        super().__init__(model=model, distributed=distributed)
        if modules not in ("mlp", "all"):
            raise ConfigError(f"combiner modules={modules!r}; valid: mlp, all.")
        if blocks not in ("module", "global"):
            raise ConfigError(f"combiner blocks={blocks!r}; valid: module, global.")
        self.modules, self.blocks = modules, blocks
        self._layout: ParameterBlocks | None = None
        self._layout_key: tuple[int, ...] = ()
        self._sharded, self._n = False, 0  # FSDP-sharded parameters; local elements of the tracked ones
        self.statistics: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ streaming

    def begin(self, params: list[torch.nn.Parameter]) -> None:
        super().begin(params)
        key = tuple(id(p) for p in params)
        if self._layout is None or key != self._layout_key:
            self._layout, self._layout_key = ParameterBlocks(self.model, params, self.modules, self.blocks), key
        layout = self._layout
        shards = [local(p) for p in layout.tracked]  # FSDP: this rank's shard of each parameter
        self._sharded = any(shard is not p for shard, p in zip(shards, layout.tracked))
        n = self._n = sum(shard.numel() for shard in shards)
        m = layout.num_blocks
        device = layout.tracked[0].device
        # [S_pla] and [S_sta | Q_pla | Q_sta | J]: one flat buffer each, so one collective reduces each.
        self._flat_pla = torch.zeros(n, dtype=layout.dtype, device=device)
        self._flat_sta = torch.zeros(n + 2 * m + 1, dtype=layout.dtype, device=device)
        self.sum_pla = _views(self._flat_pla, shards)
        self.sum_sta = _views(self._flat_sta, shards)
        self.sq_pla = self._flat_sta[n : n + m]
        self.sq_sta = self._flat_sta[n + m : n + 2 * m]
        self.count = self._flat_sta[n + 2 * m]
        for p in layout.tracked:
            p.grad = None

    def rescale(self, scale: Tensor) -> None:
        """Scale both streams (the updater only rescales when every term came from the policy forward):
        sums by ``scale``, the squared-norm sums by its square; untracked .grad as the plain sum."""
        super().rescale(scale)
        self._flat_pla.mul_(scale.to(self._flat_pla.dtype))
        n = self._n
        s = scale.to(self._flat_sta.dtype)
        self._flat_sta[:n].mul_(s)
        self._flat_sta[n:-1].mul_(s * s)

    def backward(self, terms: dict[str, Tensor]) -> None:
        if "policy" not in terms or len(terms) < 2:
            raise ValueError(
                f"{type(self).__name__} needs a plasticity term 'policy' and a stability term, got {sorted(terms)}; "
                "set kl.coef > 0 or retention.coef > 0, or use combiner sum."
            )
        plasticity = terms["policy"]
        stability = sum(v for k, v in terms.items() if k != "policy")
        has_stability = isinstance(stability, Tensor) and stability.requires_grad
        self._harvest(plasticity, self.sum_pla, self.sq_pla, retain_graph=has_stability)
        self._harvest(stability, self.sum_sta, self.sq_sta, retain_graph=False)
        self.count += 1.0

    def _harvest(self, loss: Tensor, sums: list[Tensor], sq_norms: Tensor, *, retain_graph: bool) -> None:
        """Backward ``loss``; untracked .grad accumulate, tracked .grad are moved into the sums."""
        if not (isinstance(loss, Tensor) and loss.requires_grad):
            return  # a zero gradient sample: adds nothing to S or Q, still counts in J
        loss.backward(retain_graph=retain_graph)
        layout = self._layout
        present = [i for i, p in enumerate(layout.tracked) if p.grad is not None]
        if present:
            grads = [local(layout.tracked[i].grad) for i in present]
            torch._foreach_add_([sums[i] for i in present], grads)
            if self.needs_variance:
                norms = torch.stack(torch._foreach_norm(grads, 2, dtype=layout.dtype))
                # all present is the usual case; the list index (a host-to-device copy) only for unused params
                index = layout.block_index if len(present) == len(layout.tracked) else layout.block_index[present]
                sq_norms.index_add_(0, index, norms.square())
        for p in layout.tracked:
            p.grad = None

    # ------------------------------------------------------------------ finalize

    def finalize(self, params: list[torch.nn.Parameter]) -> Metrics:
        layout = self._layout
        m = layout.num_blocks
        if self._sharded:  # FSDP: S is sharded (already summed over ranks), Q holds this rank's partial norms
            squares = self._flat_sta[self._n : self._n + 2 * m]
            squares.copy_(all_reduce_sum(squares))  # J stays: every rank counted the same micro-batch indices
        elif self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._flat_pla, op=dist.ReduceOp.SUM)
            dist.all_reduce(self._flat_sta, op=dist.ReduceOp.SUM)
            if layout.untracked:
                all_reduce_gradients(layout.untracked)
        dot = blockwise_inner(self.sum_pla, self.sum_sta, layout.block_index, m)  # (M,) ⟨S_pla, S_sta⟩
        sq_pla = blockwise_inner(self.sum_pla, self.sum_pla, layout.block_index, m)  # (M,) ‖S_pla‖²
        sq_sta = blockwise_inner(self.sum_sta, self.sum_sta, layout.block_index, m)  # (M,) ‖S_sta‖²
        if self._sharded:  # partial inner products over the shards, summed into the full ones
            dot, sq_pla, sq_sta = all_reduce_sum(torch.stack([dot, sq_pla, sq_sta])).unbind(0)
        # the step's per-block statistics after the all-reduce, kept for diagnostics and tests
        self.statistics = {"dot": dot, "sq_pla": sq_pla, "sq_sta": sq_sta, "samples": self.count.clone()}
        self.statistics.update(sq_norm_sum_pla=self.sq_pla.clone(), sq_norm_sum_sta=self.sq_sta.clone())
        coef_pla, coef_sta, metrics = self.coefficients(dot, sq_pla, sq_sta)
        self.statistics.update(coef_pla=coef_pla, coef_sta=coef_sta)
        # per-parameter coefficients by a gather (indexing with a 0-d tensor would sync with the device)
        param_coef_pla, param_coef_sta = coef_pla[layout.block_index], coef_sta[layout.block_index]  # (N,)
        for k, (p, s_pla, s_sta) in enumerate(zip(layout.tracked, self.sum_pla, self.sum_sta)):
            s_pla.mul_(param_coef_pla[k]).addcmul_(s_sta, param_coef_sta[k])  # grad = a_pla·S_pla + a_sta·S_sta
            p.grad = as_shard_of(s_pla if s_pla.dtype == p.dtype else s_pla.to(p.dtype), p)
        metrics.update(_geometry_metrics(dot, sq_pla, sq_sta, coef_pla, coef_sta))
        metrics["pcr/samples"] = self.count.detach().clone()
        self.sum_pla = self.sum_sta = []
        self._flat_pla = self._flat_sta = None  # S_pla's buffer lives on as the tracked .grad (same dtype)
        return metrics

    def coefficients(self, dot: Tensor, sq_pla: Tensor, sq_sta: Tensor) -> tuple[Tensor, Tensor, Metrics]:
        """Per-block (a_pla (M,), a_sta (M,), metrics) with grad[m] = a_pla[m]·S_pla[m] + a_sta[m]·S_sta[m]."""
        raise NotImplementedError


class SoftProjectionCombiner(ConflictCombiner):
    """Soft projection of the plasticity gradient with a constant α (PCR's fixed-α ablation, Fig. 4a)."""

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        distributed: bool = False,
        alpha: float = 0.5,
        modules: str = "mlp",
        blocks: str = "module",
        add_stability: bool = True,
    ) -> None:
        super().__init__(model=model, distributed=distributed, modules=modules, blocks=blocks)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"combiner alpha={alpha}; it must lie in [0, 1].")
        self.alpha = float(alpha)
        self.add_stability = add_stability

    def block_alpha(self, sq_pla: Tensor, sq_sta: Tensor) -> Tensor:  # (M,)
        return torch.full_like(sq_pla, self.alpha)

    def coefficients(self, dot: Tensor, sq_pla: Tensor, sq_sta: Tensor) -> tuple[Tensor, Tensor, Metrics]:
        alpha = self.block_alpha(sq_pla, sq_sta)
        self.statistics["alpha"] = alpha
        kappa = conflict_coefficient(dot, sq_sta, alpha)
        coef_sta = (1.0 if self.add_stability else 0.0) - kappa
        metrics = {"pcr/alpha_mean": alpha.mean(), "pcr/alpha_min": alpha.min(), "pcr/alpha_max": alpha.max()}
        return torch.ones_like(kappa), coef_sta, metrics


class PCRCombiner(SoftProjectionCombiner):
    """PCR: soft projection with α[m] = σ²_pla / (σ²_pla + σ²_sta + ε) from the step's per-block samples.

    [INF] J < 2 samples give σ² = 0 for both objectives, hence α = 0: the plain sum (see module docstring).
    """

    needs_variance = True

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        distributed: bool = False,
        modules: str = "mlp",
        blocks: str = "module",
        add_stability: bool = True,
        eps: float = 0.0,
    ) -> None:
        super().__init__(
            model=model, distributed=distributed, alpha=0.0, modules=modules, blocks=blocks, add_stability=add_stability
        )
        self.eps = float(eps)

    def block_alpha(self, sq_pla: Tensor, sq_sta: Tensor) -> Tensor:  # (M,)
        var_pla = trace_variance_from_norms(sq_pla, self.sq_pla, self.count)
        var_sta = trace_variance_from_norms(sq_sta, self.sq_sta, self.count)
        return pcr_alpha(var_pla, var_sta, self.eps)


class PCGradCombiner(ConflictCombiner):
    """Symmetric two-objective PCGrad on the step's mean gradients, per block (Yu et al. 2020, §2 baselines).

    grad[m] = S_pla' + S_sta' with each projected against the other's original sum when they conflict.
    """

    def coefficients(self, dot: Tensor, sq_pla: Tensor, sq_sta: Tensor) -> tuple[Tensor, Tensor, Metrics]:
        # S_pla' = S_pla − κ(S_pla → S_sta)·S_sta and S_sta' = S_sta − κ(S_sta → S_pla)·S_pla
        kappa_pla = conflict_coefficient(dot, sq_sta)
        kappa_sta = conflict_coefficient(dot, sq_pla)
        return 1.0 - kappa_sta, 1.0 - kappa_pla, {}


def _views(flat: Tensor, params: list[torch.nn.Parameter]) -> list[Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    denom = (sq_a * sq_b).sqrt()
    return torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(dot))


def _geometry_metrics(dot: Tensor, sq_pla: Tensor, sq_sta: Tensor, coef_pla: Tensor, coef_sta: Tensor) -> Metrics:
    """Conflict share and cosines over the tracked blocks, from block statistics only (no extra pass)."""
    final_dot = coef_pla * dot + coef_sta * sq_sta  # ⟨grad, S_sta⟩ per block
    final_sq = coef_pla.square() * sq_pla + 2 * coef_pla * coef_sta * dot + coef_sta.square() * sq_sta
    return {
        "pcr/conflict_frac": (dot < 0).float().mean(),
        "pcr/cos_pla_sta": _cosine(dot.sum(), sq_pla.sum(), sq_sta.sum()),
        "pcr/cos_pla_sta_min": _cosine(dot, sq_pla, sq_sta).min(),
        "pcr/cos_final_sta": _cosine(final_dot.sum(), final_sq.sum().clamp(min=0.0), sq_sta.sum()),
    }
