"""MoE Routing Replay: record the experts a router chose, and replay them in a later forward (R2 / R3).

Zheng et al., "Stabilizing RL with LLMs: Formulation and Practices", arXiv 2512.01374 (methods.md §5, §8
item 12); R3 originally Ma et al., arXiv 2510.11370. For an MoE policy the token probability also depends on
the routed experts e, so the trainer's π_θ(y_t | ·, e^π_t) differs from the sampler's μ(y_t | ·, e^μ_t) even at
equal parameters. Routing Replay fixes the routing of the *training* forward:

    R2 (vanilla)  replay the experts chosen by the training engine in the π_old forward
    R3 (rollout)  replay the experts chosen by the inference engine while sampling

Mechanics (both): the router's top-k mask is replaced by the recorded mask I_ref, while the gate weights are
still a softmax over the *training* router logits s, so the router keeps its gradient:

    g_i = I_ref,i · exp(s_i) / Σ_j I_ref,j · exp(s_j)                                   (rule "restricted_softmax")

[INF] That formula is the paper's, written for Qwen3-30B-A3B whose router renormalises the top-k
probabilities (``norm_topk_prob=True``), where it *is* the router's own rule. A router with
``norm_topk_prob=False`` (Qwen1.5/2-MoE, and transformers' default for both classes) weights the chosen experts
with the unrenormalised softmax over all E logits, g_i = I_ref,i · softmax(s)_i; replaying that way (rule
"router", what Megatron-style replay does) keeps everything but the expert choice unchanged. The default is the
paper's formula; with ``norm_topk_prob=False`` the two rules give different gate weights even where the routing
agrees, so choose "router" to replay a norm_topk_prob=False model without changing its gating.

Supported: the router modules of transformers >= 5 (verified with 5.23) ``Qwen2MoeTopKRouter`` (inside
``Qwen2MoeSparseMoeBlock``) and ``Qwen3MoeTopKRouter`` (inside ``Qwen3MoeSparseMoeBlock``), whose forward returns
(router_logits (N, E), top-k weights (N, k), top-k indices (N, k)) for N = B·S flattened tokens. In transformers
4.x the gate of these blocks was a plain nn.Linear with top-k inline in the block; such a model (and any other
MoE block) raises :class:`UnsupportedMoEError`. Recording and replay are forward hooks on the router modules:
nothing is monkey-patched, and the hooks are removed when the context exits.

Recorded routing is ``routed_experts: long (B, S, L, k)`` aligned with the input positions prompt + completion
(S = Tp + T); -1 marks a position that was never routed (the last sampled token is never fed back to the
sampler). Positions of left padding and after EOS hold garbage routing; the replayer uses any valid recorded
row and falls back to the router's own top-k for a row holding an index outside [0, E).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from steadyrl.config import ConfigError
from steadyrl.ops.masking import masked_mean
from steadyrl.types import Metrics

# MoE block class -> router class it must hold (transformers >= 5).
SUPPORTED_MOE_CLASSES: dict[str, str] = {
    "Qwen2MoeSparseMoeBlock": "Qwen2MoeTopKRouter",
    "Qwen3MoeSparseMoeBlock": "Qwen3MoeTopKRouter",
}
REPLAY_WEIGHT_RULES = ("restricted_softmax", "router")
ROUTING_REPLAY_MODES = ("none", "R2", "R3")
WeightRule = Literal["restricted_softmax", "router"]


class UnsupportedMoEError(TypeError):
    """The model has MoE layers whose router steadyrl cannot record or replay."""


def _router_of(block: nn.Module) -> nn.Module | None:
    return getattr(block, "gate", None) or getattr(block, "router", None)


def supported_moe_layers(model: nn.Module, *, strict: bool = True) -> list[nn.Module]:
    """The router module of every MoE layer of ``model`` in depth order (L = len(result)); [] for a dense model.

    A module with ``experts`` and a ``gate`` / ``router`` attribute is an MoE block. Every such block must be one
    of SUPPORTED_MOE_CLASSES holding its matching router; otherwise ``UnsupportedMoEError`` is raised
    (``strict=False`` returns [] instead, for callers that only want to know whether recording is possible).
    """
    routers, unsupported = [], []
    for name, module in model.named_modules():
        router = _router_of(module)
        if not hasattr(module, "experts") or router is None:
            continue
        block_cls, router_cls = type(module).__name__, type(router).__name__
        if SUPPORTED_MOE_CLASSES.get(block_cls) == router_cls:
            routers.append(router)
        else:
            unsupported.append(f"{name or '<root>'} ({block_cls} with {router_cls})")
    if unsupported:
        if not strict:
            return []
        supported = ", ".join(f"{b} with {r}" for b, r in SUPPORTED_MOE_CLASSES.items())
        raise UnsupportedMoEError(
            f"MoE routing record/replay does not support {unsupported[0]}"
            f"{f' and {len(unsupported) - 1} more layers' if len(unsupported) > 1 else ''}; supported (transformers "
            f">= 5): {supported}. A transformers 4.x Qwen-MoE block (gate = nn.Linear) needs transformers >= 5; "
            "otherwise set routing_replay=none."
        )
    return routers


def check_routing_replay(model: nn.Module, mode: str, *, weight_rule: WeightRule = "restricted_softmax") -> bool:
    """Validate ``routing_replay`` = mode for ``model`` before training; True when the model's routing can be
    recorded (a supported MoE model), which turns on the routing metrics.

    Dense model with R2/R3 -> ConfigError; unsupported MoE with R2/R3 -> UnsupportedMoEError; with "none" an
    unsupported MoE model trains without routing metrics. Warns when the replay weight rule differs from the
    model's own gating (restricted_softmax on a norm_topk_prob=False router).
    """
    if mode not in ROUTING_REPLAY_MODES:
        raise ConfigError(f"routing_replay={mode!r}; valid: {', '.join(ROUTING_REPLAY_MODES)}.")
    if weight_rule not in REPLAY_WEIGHT_RULES:
        raise ValueError(f"replay weight rule {weight_rule!r}; valid: {', '.join(REPLAY_WEIGHT_RULES)}.")
    routers = supported_moe_layers(model, strict=mode != "none")
    if mode == "none":
        return bool(routers)
    if not routers:
        raise ConfigError(
            f"routing_replay={mode} needs a Mixture-of-Experts model, but {type(model).__name__} has no MoE layers; "
            "set routing_replay=none (or train an MoE model such as qwen2_moe / qwen3_moe)."
        )
    if weight_rule == "restricted_softmax" and not all(r.norm_topk_prob for r in routers):
        warnings.warn(
            f"routing_replay={mode} renormalises the gate weights over the replayed experts (the paper's formula), "
            "but this model's router does not (norm_topk_prob=False): replayed gate weights differ from the "
            "model's own even where the routing agrees. Use a norm_topk_prob=True model or the 'router' rule.",
            stacklevel=2,
        )
    return True


def replay_routing_weights(
    router_logits: Tensor,  # (N, E) training router logits s, with gradient
    expert_indices: Tensor,  # (N, k) long, the experts to use (recorded I_ref)
    *,
    rule: WeightRule = "restricted_softmax",
    norm_topk_prob: bool = True,
) -> Tensor:  # (N, k) float32 gate weights g, differentiable w.r.t. router_logits
    """Gate weights of the replayed experts from the training router logits (arXiv 2512.01374, methods.md §5).

        restricted_softmax   g_i = exp(s_i) / Σ_{j ∈ I_ref} exp(s_j)             (the paper's formula)
        router               g_i = softmax(s)_i, then / Σ_{j ∈ I_ref} softmax(s)_j  if norm_topk_prob
                             (the router's own rule applied to the recorded experts; [INF] see module doc)

    Both equal the router's top-k weights when I_ref is its own top-k and norm_topk_prob=True. Computed in
    float32 like the transformers routers. Not detached: the replayed gates train the router.
    """
    if rule == "restricted_softmax":
        return torch.softmax(router_logits.float().gather(-1, expert_indices), dim=-1)
    if rule == "router":
        weights = torch.softmax(router_logits.float(), dim=-1).gather(-1, expert_indices)
        return weights / weights.sum(dim=-1, keepdim=True) if norm_topk_prob else weights
    raise ValueError(f"replay weight rule {rule!r}; valid: {', '.join(REPLAY_WEIGHT_RULES)}.")


def routing_agreement(
    routed_a: Tensor,  # (B, S, L, k) expert indices
    routed_b: Tensor,  # (B, S, L, k) expert indices
    mask: Tensor,  # (B, S) bool, positions that count
) -> Metrics:
    """How often two routings choose the same experts, compared as top-k SETS (order within k ignored).

        routing/agreement              mean over valid (token, layer) pairs of 1[set(a_{t,l}) = set(b_{t,l})]
        routing/agreement_all_layers   mean over valid tokens of Π_l 1[set(a_{t,l}) = set(b_{t,l})]

    Masked positions may hold anything (garbage, -1); they never change the result.
    """
    same = (routed_a.sort(dim=-1).values == routed_b.sort(dim=-1).values).all(dim=-1)  # (B, S, L)
    mask = mask.bool()
    return {
        "routing/agreement": masked_mean(same.float().mean(dim=-1), mask),
        "routing/agreement_all_layers": masked_mean(same.all(dim=-1).float(), mask),
    }


def routed_positions_mask(
    prompt_mask: Tensor,  # (B, Tp) bool
    response_mask: Tensor,  # (B, T) bool
) -> Tensor:  # (B, Tp + T) bool
    """Input positions whose routing can change a counted log-prob: real prompt tokens, and completion token j
    when token j+1 is counted (it is then an input of that prediction). The last sampled token is never an
    input, so its (never recorded) routing is left out."""
    feeds_next = torch.cat([response_mask[:, 1:], torch.zeros_like(response_mask[:, :1])], dim=1)
    return torch.cat([prompt_mask.bool(), feeds_next.bool()], dim=1)


class _RouterHooks:
    """A context manager that puts ``self._hook(layer)`` as a forward hook on every router, and removes them."""

    routers: list[nn.Module]
    _handles: list

    def _hook(self, layer: int):
        raise NotImplementedError

    def __enter__(self):
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class RoutingRecorder(_RouterHooks):
    """Records every forward call's top-k expert indices at every MoE layer of ``model``.

        with RoutingRecorder(model) as recorder:
            out = model.generate(...)              # or any forward over (B, S) tokens
        routed = recorder.routed_experts(B, S)     # (B, S, L, k) long, or None for a dense model

    The calls of one layer are concatenated along the sequence: a KV-cache generate gives the prefill (B, Tp)
    then one position per step, i.e. Tp + T − 1 positions (the last sampled token is never fed back);
    ``seq_len`` pads the end with -1. Nested inside a :class:`RoutingReplayer`, it records the replayed experts.
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = supported_moe_layers(model)
        self.calls: list[list[Tensor]] = [[] for _ in self.routers]
        self._handles: list = []

    def _hook(self, layer: int):
        def record(module: nn.Module, args, output) -> None:
            self.calls[layer].append(output[2].detach())

        return record

    def routed_experts(self, batch_size: int, seq_len: int | None = None) -> Tensor | None:
        """(B, S, L, k) long indices of the calls so far (S = seq_len when given, padded with -1); None if dense."""
        if not self.routers or not self.calls[0]:
            return None
        if len({len(c) for c in self.calls}) != 1:
            raise RuntimeError("MoE layers saw different numbers of forward calls; cannot align the recorded routing.")
        per_layer = [torch.cat([c.reshape(batch_size, -1, c.shape[-1]) for c in calls], dim=1) for calls in self.calls]
        routed = torch.stack(per_layer, dim=2).long()
        if seq_len is not None:
            if routed.shape[1] > seq_len:
                raise ValueError(f"recorded {routed.shape[1]} positions, more than seq_len={seq_len}.")
            pad = routed.new_full((batch_size, seq_len - routed.shape[1], *routed.shape[2:]), -1)
            routed = torch.cat([routed, pad], dim=1)
        return routed


class RoutingReplayer(_RouterHooks):
    """Makes every MoE router of ``model`` use recorded experts, with differentiable gate weights.

        with RoutingReplayer(model, routed_experts):   # (B, S, L, k), aligned with the forward's (B, S) tokens
            out = model(input_ids)                     # and keep it open through backward under activation
            loss.backward()                            # checkpointing (the routers run again there)

    Each router call must cover exactly the B·S tokens of ``routed_experts`` (one teacher-forced forward; a
    KV-cache decode is not replayable this way). The router returns (its own logits, replay_routing_weights,
    recorded indices); a row holding an index outside [0, E) (e.g. the -1 of an unrecorded position) uses the
    router's own top-k instead. ``routed_experts=None`` replays every token's own top-k, which changes only the
    gate weights to ``rule`` (R2's π_old forward, so that π_old and the replayed π_θ share one gating rule).
    The context can be entered again after it exits.
    """

    def __init__(
        self,
        model: nn.Module,
        routed_experts: Tensor | None,  # (B, S, L, k) long
        *,
        rule: WeightRule = "restricted_softmax",
    ) -> None:
        self.routers = supported_moe_layers(model)
        if not self.routers:
            raise ConfigError(
                f"{type(model).__name__} has no MoE layers, so there is no routing to replay; set routing_replay=none."
            )
        if rule not in REPLAY_WEIGHT_RULES:
            raise ValueError(f"replay weight rule {rule!r}; valid: {', '.join(REPLAY_WEIGHT_RULES)}.")
        if routed_experts is not None:
            k = self.routers[0].top_k
            if routed_experts.dim() != 4 or routed_experts.shape[2:] != (len(self.routers), k):
                raise ValueError(
                    f"routed_experts must be (B, S, L={len(self.routers)}, k={k}), got {tuple(routed_experts.shape)}."
                )
        self.routed_experts = routed_experts
        self.rule = rule
        self._handles: list = []

    def _hook(self, layer: int):
        def replay(router: nn.Module, args, output):
            router_logits, _, own_indices = output
            indices = own_indices
            if self.routed_experts is not None:
                recorded = self.routed_experts[:, :, layer].reshape(-1, own_indices.shape[-1])
                if recorded.shape[0] != own_indices.shape[0]:
                    raise ValueError(
                        f"routing replay: the router saw {own_indices.shape[0]} tokens but routed_experts holds "
                        f"{recorded.shape[0]} (B·S); replay needs one teacher-forced forward over the recorded (B, S)."
                    )
                recorded = recorded.to(device=own_indices.device, dtype=torch.long)
                valid = ((recorded >= 0) & (recorded < router.num_experts)).all(dim=-1, keepdim=True)
                indices = torch.where(valid, recorded, own_indices)
            weights = replay_routing_weights(router_logits, indices, rule=self.rule, norm_topk_prob=router.norm_topk_prob)
            return router_logits, weights.to(router_logits.dtype), indices

        return replay
