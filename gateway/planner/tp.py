"""Tensor-parallel rules as LMDeploy applies them, and the per-TP verdict for a GPU budget.

Rules, checked in this order (the first broken one is the reason):
1. TP stays within one node: ``tp <= gpus_per_node``.
2. ``num_attention_heads % tp == 0``.
3. KV heads: ``kv % tp == 0`` when ``kv >= tp``, otherwise ``tp % kv == 0`` (KV heads are replicated).
4. Weights per GPU plus the runtime reserve fit in GPU memory.
5. The KV cache (``cache_max_entry_count`` x memory left after weights and reserve) holds at least one
   sequence of ``session_len`` tokens.
A TP that is not a power of two is a warning only: LMDeploy's help text asks for 2^n but enforces nothing.

Runtime reserve: each GPU keeps ``RUNTIME_RESERVE_GIB`` outside weights and KV cache for the CUDA
context (~0.5 GiB), NCCL buffers (~0.5 GiB with TP > 1), cuBLAS workspaces and the activations of one
``max_prefill_token_num`` chunk (the rest). LMDeploy's ``cache_max_entry_count`` then takes its share of
what is left, as LMDeploy 0.18 does: TurboMind creates its model (weights and activation buffers) first, then
sizes the cache as ``cache_max_entry_count`` x the free memory it finds (the smallest over the TP ranks),
in blocks of ``cache_block_seq_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import UserError
from gateway.planner.gpus import GpuSpec
from gateway.planner.knobs import DEFAULT_KNOBS, EngineKnobs
from gateway.planner.model import ModelSpec, kv_element_bytes

GIB = 1024**3
RUNTIME_RESERVE_GIB = 3.0
# A quantised KV cache keeps a 16-bit scale and a 16-bit zero point per token, head, and K or V
# (TurboMind's ``kernels/attention/block.h``: ``token_param_size`` is 2 x 16 bits when quantised).
KV_QUANT_PARAM_BYTES = 4


@dataclass(frozen=True)
class TpVerdict:
    """Whether one TP size can serve the model on the GPU type, and with what capacity."""

    tp: int
    feasible: bool
    reason: str | None
    max_replicas: int
    weights_per_gpu_bytes: int
    kv_cache_bytes_per_gpu: int
    kv_cache_tokens_per_replica: int
    max_sequences_per_replica: int  # concurrent sequences of session_len tokens the KV cache holds
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "tp": self.tp,
            "feasible": self.feasible,
            "reason": self.reason,
            "max_replicas": self.max_replicas,
            "weights_per_gpu_bytes": self.weights_per_gpu_bytes,
            "kv_cache_bytes_per_gpu": self.kv_cache_bytes_per_gpu,
            "kv_cache_tokens_per_replica": self.kv_cache_tokens_per_replica,
            "max_sequences_per_replica": self.max_sequences_per_replica,
            "warnings": list(self.warnings),
        }


def divisibility_reason(model: ModelSpec, tp: int) -> str | None:
    """Why LMDeploy cannot split this model ``tp`` ways, or None when it can."""
    if model.num_attention_heads % tp:
        return f"tp={tp}: {model.num_attention_heads} attention heads are not divisible by {tp}"
    kv = model.num_kv_heads
    if kv >= tp and kv % tp:
        return f"tp={tp}: {kv} KV heads are not divisible by {tp}"
    if kv < tp and tp % kv:
        return f"tp={tp}: {tp} is not a multiple of the {kv} KV heads (needed to replicate them evenly)"
    return None


def max_replicas(tp: int, *, gpus: int, gpus_per_node: int) -> int:
    """Replicas of ``tp`` GPUs each that fit a budget of ``gpus`` spread over nodes of ``gpus_per_node``."""
    full_nodes, remainder = divmod(gpus, gpus_per_node)
    return full_nodes * (gpus_per_node // tp) + remainder // tp


def weights_per_gpu_bytes(model: ModelSpec, tp: int) -> int:
    """Each rank holds 1/tp of every split weight; norms are tiny and ignored."""
    return -(-model.weight_bytes // tp)


def kv_cache_bytes_per_token_per_gpu(model: ModelSpec, tp: int, quant_policy: int) -> float:
    """KV-cache bytes one token takes on each GPU: K and V of every layer and local KV head, and with a
    quantised cache (``quant_policy`` 4 or 8) TurboMind's scale and zero point per token, head, K and V
    (``KV_QUANT_PARAM_BYTES``)."""
    per_head = model.head_dim * kv_element_bytes(quant_policy) + (KV_QUANT_PARAM_BYTES if quant_policy else 0)
    return 2 * model.num_layers * model.kv_heads_per_gpu(tp) * per_head


def evaluate_tp(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    *,
    gpus: int,
    gpus_per_node: int,
    knobs: EngineKnobs = DEFAULT_KNOBS,
    reserve_gib: float = RUNTIME_RESERVE_GIB,
) -> TpVerdict:
    """Apply every rule to one TP size; the verdict carries capacity figures even when rejected."""
    if tp < 1:
        raise UserError(f"tp must be at least 1, not {tp}")
    weights = weights_per_gpu_bytes(model, tp)
    free_after_weights = gpu.memory_bytes - weights - int(reserve_gib * GIB)
    kv_bytes = max(0, int(knobs.cache_max_entry_count * free_after_weights))
    kv_tokens = int(kv_bytes // kv_cache_bytes_per_token_per_gpu(model, tp, knobs.quant_policy))
    session_len = knobs.session_len_for(model)
    warnings = []
    if tp & (tp - 1):
        warnings.append(f"tp={tp} is not a power of two; LMDeploy's documentation asks for 2^n")
    if model.num_kv_heads < tp:
        warnings.append(f"{model.num_kv_heads} KV heads are replicated {tp // model.num_kv_heads}x across {tp} GPUs")

    reason = None
    if tp > gpus_per_node:
        reason = f"tp={tp}: exceeds the {gpus_per_node} GPUs per node (tensor parallelism stays within one node)"
    else:
        reason = divisibility_reason(model, tp)
    if reason is None and free_after_weights <= 0:
        reason = (
            f"tp={tp}: weights need {weights / GIB:.1f} GiB per GPU plus a {reserve_gib:.1f} GiB runtime reserve, "
            f"more than the {gpu.memory_bytes / GIB:.1f} GiB of a {gpu.name}"
        )
    if reason is None and kv_tokens < session_len:
        reason = (
            f"tp={tp}: the KV cache holds {kv_tokens:,} tokens ({kv_bytes / GIB:.1f} GiB per GPU after "
            f"{weights / GIB:.1f} GiB of weights), less than one {session_len:,}-token session"
        )
    return TpVerdict(
        tp=tp,
        feasible=reason is None,
        reason=reason,
        max_replicas=max_replicas(tp, gpus=gpus, gpus_per_node=gpus_per_node) if reason is None else 0,
        weights_per_gpu_bytes=weights,
        kv_cache_bytes_per_gpu=kv_bytes,
        kv_cache_tokens_per_replica=kv_tokens,
        max_sequences_per_replica=kv_tokens // session_len,
        warnings=tuple(warnings),
    )


def plan(
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    gpus: int,
    gpus_per_node: int | None = None,
    knobs: EngineKnobs = DEFAULT_KNOBS,
    tp_sizes: list[int] | None = None,
) -> list[TpVerdict]:
    """Verdicts for every TP size from 1 to the budget (or for ``tp_sizes``)."""
    if gpus < 1:
        raise UserError(f"the GPU budget must be at least 1, not {gpus}")
    per_node = gpus if gpus_per_node is None else gpus_per_node
    if per_node < 1:
        raise UserError(f"gpus per node must be at least 1, not {per_node}")
    sizes = tp_sizes if tp_sizes is not None else list(range(1, gpus + 1))
    for tp in sizes:
        if tp > gpus:
            raise UserError(f"tp={tp} is larger than the GPU budget of {gpus}")
    return [evaluate_tp(model, gpu, tp, gpus=gpus, gpus_per_node=per_node, knobs=knobs) for tp in sizes]
