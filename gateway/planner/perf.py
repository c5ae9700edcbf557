"""Performance model of one LMDeploy engine: step times from the roofline, and analytical predictions.

Pure code (no I/O). Two users:

- the simulated engine asks :class:`StepCostModel` how long each continuous-batching step takes, given what
  the step does (how many sequences decode, over how much context, how many prompt tokens it prefills);
- the tuner asks :func:`predict` for the steady-state throughput and latency of a workload at a
  configuration, to rank candidates before measuring them.

One step of the engine runs every decoder layer once over a fused batch of decode tokens and prefill-chunk
tokens, as a sequence of kernels of two kinds. On each of the ``tp`` GPUs:

- *GEMMs* (the projections, the MLP, the LM head) read the weights (÷ TP) once and do 2 FLOPs per parameter
  per token;
- *attention* reads the KV cache of every token attended to (and writes the new tokens') and does
  4·d·context FLOPs per token and layer.

Each kind is bounded by the roofline: its bytes over ``HBM_EFFICIENCY`` times the HBM bandwidth, and its FLOPs
over ``COMPUTE_EFFICIENCY`` times the peak dense bf16 rate. A kernel streams its operands while it computes,
so the two overlap; but they overlap fully only far from the ridge point (a decode GEMM of a few sequences is
all memory, a large prefill all math), and hardly near it, where neither the loads nor the math keep the
kernel busy alone. The time of a kind is the power mean ``(memory^p + math^p)^(1/p)`` with
``p = KERNEL_OVERLAP_EXPONENT``: the sum at p = 1 (no overlap), the ideal roofline ``max`` as p grows, about
0.79 of the sum where both are equal at p = 1.5. To these add

- *communication*: two all-reduces of the step's activations per layer (after attention and after the MLP),
  ring algorithm over NVLink or PCIe, plus a per-hop latency — zero at TP 1, growing with TP, so TP scales
  sub-linearly, and much worse over PCIe;
- *overhead*: a fixed cost per step (scheduling, sampling, kernel launches).

Every constant below comes with its source in ``docs/simulator.md``. A :class:`Deviation` makes the *engine*
depart from this model on purpose; :func:`predict` never takes one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from gateway.errors import UserError
from gateway.planner.gpus import GpuSpec
from gateway.planner.knobs import DEFAULT_KNOBS, EngineKnobs
from gateway.planner.model import ModelSpec
from gateway.planner.tp import evaluate_tp, kv_cache_bytes_per_token_per_gpu

# Share of peak HBM bandwidth that decode kernels reach. From the batch-1 figure (about 100 tokens/s for
# Llama-2-7B on an A100: 13.2 GB of weights per token) together with STEP_OVERHEAD_S.
HBM_EFFICIENCY = 0.80
# Share of peak dense bf16 FLOP/s reached by GEMMs and attention (prefill and decode alike). From one
# 2,048-token prefill of Llama-2-7B on an A100 (139 ms published: 2.8e13 FLOPs at 0.65 x 312 TFLOP/s is 136 ms).
COMPUTE_EFFICIENCY = 0.65
# How far a kernel overlaps its memory traffic with its math: its time is the power mean of the two with this
# exponent (1: no overlap, the sum; large: the ideal roofline's max). See the module docstring.
KERNEL_OVERLAP_EXPONENT = 1.5
# Fixed cost of one engine step: scheduling, sampling, detokenisation, kernel launches (batch-1 residual).
STEP_OVERHEAD_S = 2.0e-3
# Share of the link bandwidth a ring all-reduce reaches (NCCL bus bandwidth over the raw figure).
ALLREDUCE_EFFICIENCY = {"nvlink": 0.80, "pcie": 0.50}
# Latency of one ring hop of an all-reduce: NVLink (NCCL, small messages) vs PCIe through the host bridge.
ALLREDUCE_HOP_LATENCY_S = {"nvlink": 3.0e-6, "pcie": 12.0e-6}
# Bytes per activation element exchanged by the all-reduce (fp16/bf16).
ACTIVATION_BYTES = 2
# TurboMind's KV-cache block size in tokens (``cache_block_seq_len``).
KV_BLOCK_TOKENS = 64


@dataclass(frozen=True)
class Deviation:
    """Factors by which the simulated engine departs from this model on purpose.

    The tuner is tested against a prior that is wrong, as every model is on real hardware. Only the
    engine's :class:`StepCostModel` applies these; :func:`predict` never sees them. All factors are
    multipliers of time (``allreduce_factor=1.5``: all-reduces take 1.5 times as long) except the
    efficiency factors, which divide it (``decode_efficiency_factor=0.8``: decode work takes 1/0.8 as long).
    """

    allreduce_factor: float = 1.0
    decode_efficiency_factor: float = 1.0  # every TP size, unless decode_efficiency_factor_by_tp names it
    decode_efficiency_factor_by_tp: Mapping[int, float] = field(default_factory=dict)
    prefill_efficiency_factor: float = 1.0
    extra_step_s: float = 0.0
    pcie_extra_step_s: float = 0.0  # added to every step of a TP > 1 engine on a PCIe GPU

    def __post_init__(self) -> None:
        for name in ("allreduce_factor", "decode_efficiency_factor", "prefill_efficiency_factor"):
            if not getattr(self, name) > 0:
                raise UserError(f"deviation: {name} must be positive, not {getattr(self, name)}")
        for tp, factor in self.decode_efficiency_factor_by_tp.items():
            if not isinstance(tp, int) or tp < 1 or not factor > 0:
                raise UserError(
                    f"deviation: decode_efficiency_factor_by_tp maps tp >= 1 to a factor > 0, not {tp}: {factor}"
                )
        for name in ("extra_step_s", "pcie_extra_step_s"):
            if getattr(self, name) < 0:
                raise UserError(f"deviation: {name} must not be negative, not {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, source: str = "deviation") -> Deviation:
        """Build from parsed YAML/JSON; unknown keys and wrong types raise UserError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown deviation field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values: dict[str, object] = {}
        for key, value in data.items():
            if key == "decode_efficiency_factor_by_tp":
                if not isinstance(value, Mapping):
                    raise UserError(f"{source}: {key} must map TP sizes to factors, not {value!r}")
                values[key] = {_as_int(tp, f"{source}: {key} key"): _as_float(v, f"{source}: {key}[{tp}]")
                               for tp, v in value.items()}
            else:
                values[key] = _as_float(value, f"{source}: {key}")
        return cls(**values)  # type: ignore[arg-type]

    def decode_factor(self, tp: int) -> float:
        return self.decode_efficiency_factor_by_tp.get(tp, self.decode_efficiency_factor)


NO_DEVIATION = Deviation()


def _as_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{what} must be a number, not {value!r}")
    return float(value)


def _as_int(value: object, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise UserError(f"{what} must be a TP size (integer), not {value!r}") from None


@dataclass(frozen=True)
class StepBatch:
    """What one engine step computes, in aggregate (the cost model needs no per-sequence detail).

    ``prefill_attention_pairs`` is the number of (query, key) token pairs of the prefill chunks' attention:
    for a chunk of ``c`` tokens that follows ``p`` tokens already in the cache, ``c * (p + c / 2)``.
    """

    decode_sequences: int = 0
    decode_context_tokens: int = 0  # sum over decoding sequences of the tokens they attend to
    prefill_tokens: int = 0
    prefill_context_tokens: int = 0  # sum over prefill chunks of the cached tokens they attend to
    prefill_attention_pairs: float = 0.0

    @property
    def tokens(self) -> int:
        return self.decode_sequences + self.prefill_tokens


def overlapped_s(memory_s: float, math_s: float) -> float:
    """Time of kernels that need ``memory_s`` of HBM traffic and ``math_s`` of math, which they partly overlap
    (the power mean with ``KERNEL_OVERLAP_EXPONENT``)."""
    p = KERNEL_OVERLAP_EXPONENT
    return float((memory_s**p + math_s**p) ** (1 / p))


@dataclass(frozen=True)
class StepCost:
    """One step's time by part, in seconds: each kernel kind's memory and math time (which overlap, see
    :func:`overlapped_s`), then communication and overhead. :attr:`total_s` is the step's time."""

    weights_s: float  # GEMMs: reading the weights
    gemm_math_s: float  # GEMMs: their FLOPs
    kv_s: float  # attention: reading and writing the KV cache
    attention_math_s: float  # attention: its FLOPs
    allreduce_s: float
    overhead_s: float

    @property
    def gemm_s(self) -> float:
        return overlapped_s(self.weights_s, self.gemm_math_s)

    @property
    def attention_s(self) -> float:
        return overlapped_s(self.kv_s, self.attention_math_s)

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.attention_s + self.allreduce_s + self.overhead_s


class StepCostModel:
    """Step times of one engine (model on ``tp`` GPUs of one type); the per-step arithmetic is precomputed.

    ``deviation`` is for the simulated engine only (see :class:`Deviation`).
    """

    def __init__(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, *, quant_policy: int = 0, deviation: Deviation = NO_DEVIATION
    ) -> None:
        if tp < 1:
            raise UserError(f"tp must be at least 1, not {tp}")
        self.model, self.gpu, self.tp, self.deviation = model, gpu, tp, deviation
        lm_head_params = model.vocab_size * model.hidden_size
        # Weights every step reads: all decoder layers and the LM head (the embedding lookup is negligible).
        self._weight_bytes = (model.layer_params + lm_head_params) * model.dtype_bytes / tp
        self._bandwidth = gpu.hbm_bytes_per_s * HBM_EFFICIENCY
        self._flops = gpu.flops_per_s * COMPUTE_EFFICIENCY
        self._dense_flops_per_token = 2 * model.layer_params / tp
        self._lm_head_flops = 2 * lm_head_params / tp
        self._attention_flops_per_pair = 4 * model.num_layers * model.num_attention_heads * model.head_dim / tp
        self._kv_bytes_per_token = kv_cache_bytes_per_token_per_gpu(model, tp, quant_policy)
        self._allreduces_per_step = 2 * model.num_layers
        self._activation_bytes_per_token = model.hidden_size * ACTIVATION_BYTES
        link = gpu.interconnect
        # NVLink figures are bidirectional totals per GPU; a ring sends one way. PCIe figures are per direction.
        per_direction = gpu.interconnect_bytes_per_s / 2 if link == "nvlink" else gpu.interconnect_bytes_per_s
        self._link_bandwidth = per_direction * ALLREDUCE_EFFICIENCY[link]
        self._ring_hops = 2 * (tp - 1)
        self._hop_latency_s = ALLREDUCE_HOP_LATENCY_S[link]
        self._overhead_s = STEP_OVERHEAD_S + deviation.extra_step_s
        if link == "pcie" and tp > 1:
            self._overhead_s += deviation.pcie_extra_step_s
        self._decode_factor = deviation.decode_factor(tp)

    @property
    def kv_bytes_per_token(self) -> float:
        return self._kv_bytes_per_token

    def allreduce_s(self, tokens: int) -> float:
        """Time of one ring all-reduce of ``tokens`` activations across the TP group (0 at TP 1)."""
        if self.tp == 1 or tokens <= 0:
            return 0.0
        message_bytes = tokens * self._activation_bytes_per_token
        transfer = 2 * (self.tp - 1) / self.tp * message_bytes / self._link_bandwidth
        return transfer + self._ring_hops * self._hop_latency_s

    def cost(self, batch: StepBatch) -> StepCost:
        """The time of one step, by part. An empty step costs nothing. Deviation factors scale decode work
        (weights, KV cache, decode FLOPs) and prefill FLOPs separately, before they overlap."""
        if batch.tokens <= 0:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        deviation = self.deviation
        decode_factor, prefill_factor = self._decode_factor, deviation.prefill_efficiency_factor
        kv_tokens = batch.decode_context_tokens + batch.prefill_context_tokens + batch.tokens
        decode_gemm_flops = batch.decode_sequences * (self._dense_flops_per_token + self._lm_head_flops)
        prefill_gemm_flops = batch.prefill_tokens * self._dense_flops_per_token
        decode_attention_flops = batch.decode_context_tokens * self._attention_flops_per_pair
        prefill_attention_flops = batch.prefill_attention_pairs * self._attention_flops_per_pair
        return StepCost(
            weights_s=self._weight_bytes / self._bandwidth / decode_factor,
            gemm_math_s=(decode_gemm_flops / decode_factor + prefill_gemm_flops / prefill_factor) / self._flops,
            kv_s=kv_tokens * self._kv_bytes_per_token / self._bandwidth / decode_factor,
            attention_math_s=(decode_attention_flops / decode_factor + prefill_attention_flops / prefill_factor)
            / self._flops,
            allreduce_s=self._allreduces_per_step * self.allreduce_s(batch.tokens) * deviation.allreduce_factor,
            overhead_s=self._overhead_s,
        )

    def step_s(self, batch: StepBatch) -> float:
        return self.cost(batch).total_s


@dataclass(frozen=True)
class Workload:
    """A load profile: a closed loop of ``concurrency`` clients, each sending its next request when the last
    one finishes. Lengths are means, in tokens."""

    concurrency: int
    mean_prompt_tokens: float
    mean_output_tokens: float

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UserError(f"workload concurrency must be at least 1, not {self.concurrency}")
        if not self.mean_prompt_tokens >= 1 or not self.mean_output_tokens >= 1:
            raise UserError(
                f"workload mean lengths must be at least 1 token, not prompt={self.mean_prompt_tokens} "
                f"output={self.mean_output_tokens}"
            )


@dataclass(frozen=True)
class Prediction:
    """Steady-state figures of one engine replica under a workload (seconds, per second)."""

    running_batch: int  # sequences decoding together
    batch_limit: str  # what bounds the batch: "concurrency", "max_batch_size" or "kv_cache"
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: float  # mean time to first token, queueing included
    tpot_s: float  # mean time per output token after the first
    e2e_latency_s: float  # mean end-to-end latency, queueing included
    queue_s: float  # mean wait before a request is admitted


def predict(
    model: ModelSpec, gpu: GpuSpec, tp: int, workload: Workload, *, knobs: EngineKnobs = DEFAULT_KNOBS
) -> Prediction:
    """Analytical steady state of continuous batching for ``workload`` on one replica at ``tp``.

    The same rules as the simulated engine's scheduler (TurboMind's), at their means: the running batch is the
    smallest of the concurrency, ``max_batch_size`` and the sequences the KV cache holds at their mean
    occupancy (prompt plus half the output, plus half a block). Each step decodes one token for every running
    sequence and prefills the prompts of the requests that replace finished ones; a prompt longer than what
    the step's forward budget leaves (``max_prefill_token_num + max_batch_size`` less the decode tokens, cut
    to a block boundary) takes several steps. A closed-loop client's next request arrives just after a step
    began, so it waits about one step before its prefill runs. Clients beyond the batch wait (Little's law
    gives the wait). Raises UserError when the planner rejects ``tp``.
    """
    verdict = evaluate_tp(model, gpu, tp, gpus=tp, gpus_per_node=tp, knobs=knobs)
    if not verdict.feasible:
        raise UserError(verdict.reason or f"tp={tp} is not feasible")
    cost = StepCostModel(model, gpu, tp, quant_policy=knobs.quant_policy)
    prompt, output = workload.mean_prompt_tokens, workload.mean_output_tokens
    mean_context = prompt + output / 2
    max_batch_size = knobs.batch_size_on(gpu)
    limits = {
        "concurrency": workload.concurrency,
        "max_batch_size": max_batch_size,
        "kv_cache": max(1, int(verdict.kv_cache_tokens_per_replica // (mean_context + KV_BLOCK_TOKENS / 2))),
    }
    batch_limit = min(limits, key=lambda name: limits[name])
    batch = limits[batch_limit]

    def step(decoding: float, prefill_tokens: float, prefill_context: float = 0.0) -> float:
        return cost.step_s(
            StepBatch(
                decode_sequences=round(decoding),
                decode_context_tokens=round(decoding * mean_context),
                prefill_tokens=round(prefill_tokens),
                prefill_context_tokens=round(prefill_context),
                prefill_attention_pairs=prefill_tokens * (prefill_context + prefill_tokens / 2),
            )
        )

    # Steady state: batch/output requests finish per step, and as many new prompts are prefilled.
    tpot_s = step(batch, batch * prompt / output)
    requests_per_s = batch / (output * tpot_s)
    forward_budget = knobs.max_prefill_token_num + max_batch_size - (batch - 1)
    chunk = max(KV_BLOCK_TOKENS, forward_budget // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS)
    chunks = math.ceil(prompt / chunk)
    prefill_s = sum(
        step(batch - 1, min(chunk, prompt - i * chunk), prefill_context=i * chunk) for i in range(chunks)
    )
    service_ttft_s = prefill_s + (tpot_s if batch > 1 else 0.0)
    service_e2e_s = service_ttft_s + (output - 1) * tpot_s
    queue_s = max(0.0, workload.concurrency / requests_per_s - service_e2e_s) if workload.concurrency > batch else 0.0
    return Prediction(
        running_batch=batch,
        batch_limit=batch_limit,
        requests_per_s=requests_per_s,
        output_tokens_per_s=requests_per_s * output,
        ttft_s=queue_s + service_ttft_s,
        tpot_s=tpot_s,
        e2e_latency_s=queue_s + service_e2e_s,
        queue_s=queue_s,
    )


def kv_cache_blocks(model: ModelSpec, gpu: GpuSpec, tp: int, *, knobs: EngineKnobs = DEFAULT_KNOBS) -> int:
    """KV-cache blocks of ``KV_BLOCK_TOKENS`` one replica holds (the planner's capacity, in blocks)."""
    verdict = evaluate_tp(model, gpu, tp, gpus=tp, gpus_per_node=tp, knobs=knobs)
    return verdict.kv_cache_tokens_per_replica // KV_BLOCK_TOKENS
