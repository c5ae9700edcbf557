"""Published serving figures the simulated engine is checked against, with their sources and setups.

Two sets, kept apart: ``FITTING`` holds the rows the performance model's constants were chosen against
(LMDeploy's two A100 request-throughput rows and its Llama-2-7B static-batch curve); ``VALIDATION`` holds every
other public figure used, none of which set a constant. Each row says what was run (model, GPU, TP, engine
settings, request pattern) as the source describes it, so the replay can run the same thing.

Sources
- ``lmdeploy-a100``: LMDeploy, ``docs/en/benchmark/a100_fp16.md`` (v0.2.0, 8 x A100-SXM-80GB, CUDA 11.8,
  TurboMind, fp16). Engine settings from the same release's ``benchmark/config/*.ini``: the KV cache is a
  count of 128-token blocks (``cache_max_entry_count`` >= 1 means blocks in v0.2.0), e.g. 1,000 for Llama-2-7B.
  Request throughput: ``profile_throughput.py``, 3,000 ShareGPT prompts, a closed loop of ``batch`` clients.
  Static: ``profile_generation.py``, ``batch`` clients each sending 3 identical requests in a row.
- ``lmdeploy-kvquant``: LMDeploy, ``docs/en/quantization/kv_quant.md`` (v0.4.0): request throughput of
  ``profile_throughput.py`` with 10,000 ShareGPT prompts, TP 1, KV cache ``cache_max_entry_count`` of free
  memory (0.8 or 0.9), fp16 / int8 / int4 KV cache. The GPU is not stated; LMDeploy's benchmark machines are
  A100-80GB (its fp16 Llama-2-7B figure, 14.98 requests/s, agrees with the A100 page's 14.56), so A100-80GB is
  assumed.
- ``trtllm-a100``: TensorRT-LLM, ``docs/source/performance.md`` (v0.6.1 throughput, v0.5 first-token latency),
  A100 FP16, static batches from ``gptSessionBenchmark``. Another engine on the same GPU: its GEMM and
  attention kernels and its static batching (the batch starts together, no request joins) differ from
  TurboMind's, so differences of some percent are expected. Only TP 1 throughput rows are used: for TP > 1 the
  page does not say whether its figure is per GPU or in total.
"""

from __future__ import annotations

from dataclasses import dataclass

# Model shapes not bundled as planner cards, from each model's public config.json.
EXTRA_MODELS: dict[str, dict[str, object]] = {
    "llama-2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "torch_dtype": "float16"},
    "internlm2-chat-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544,
                          "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
}

# Mean prompt / output tokens of LMDeploy's ShareGPT sample after its filter, by tokenizer, derived from the
# published rows: (total - output tokens/s) / requests/s and output tokens/s / requests/s.
LLAMA_MEANS = (246.9, 232.7)  # Llama-2 rows (7B, 13B and 70B agree to the token)
INTERNLM_MEANS = (222.7, 199.5)  # the InternLM-20B row; also used for InternLM2 (no published counts)


@dataclass(frozen=True)
class EngineSetup:
    """One engine as the benchmark ran it. ``kv_blocks`` set: the cache is that many ``block_tokens`` blocks;
    None: the planner sizes it from ``cache_max_entry_count`` as LMDeploy 0.18 does."""

    model: str
    tp: int
    max_batch_size: int
    gpu: str = "a100-80gb"
    kv_blocks: int | None = None
    block_tokens: int = 64
    cache_max_entry_count: float = 0.8
    quant_policy: int = 0
    max_prefill_token_num: int = 8192
    session_len: int = 4096

    def describe(self) -> str:
        parts = [f"{self.model} TP{self.tp} on {self.gpu}, max batch {self.max_batch_size}"]
        if self.kv_blocks is not None:
            parts.append(f"KV {self.kv_blocks} x {self.block_tokens} tokens")
        else:
            parts.append(f"KV {self.cache_max_entry_count:g} of free memory")
        if self.quant_policy:
            parts.append(f"int{self.quant_policy} KV")
        return ", ".join(parts)


@dataclass(frozen=True)
class ShareGptRun:
    """``profile_throughput``: ``requests`` ShareGPT-like requests from a closed loop of ``concurrency``."""

    requests: int
    concurrency: int
    means: tuple[float, float] = LLAMA_MEANS

    def describe(self) -> str:
        return f"ShareGPT {self.requests} requests, {self.concurrency} clients"


@dataclass(frozen=True)
class StaticRun:
    """``profile_generation`` / ``gptSessionBenchmark``: ``batch`` clients, each sending ``rounds`` identical
    requests of ``prompt_tokens`` in and ``output_tokens`` out back to back."""

    batch: int
    prompt_tokens: int
    output_tokens: int
    rounds: int = 3

    def describe(self) -> str:
        return f"static batch {self.batch}, in {self.prompt_tokens} / out {self.output_tokens}"


@dataclass(frozen=True)
class Row:
    """One published figure: ``figure`` is ``requests/s``, ``output tokens/s`` or ``first-token latency (s)``."""

    source: str
    setup: EngineSetup
    run: ShareGptRun | StaticRun
    figure: str
    published: float
    note: str = ""


RPS, OUTPUT, FTL = "requests/s", "output tokens/s", "first-token latency (s)"

_KV_BOUND = "KV-bound: heavy-tailed lengths near the cache's capacity (see the text)"
_QUEUEING = "first-token latency is queueing under bursts (see the text)"
_NO_GEMM_TUNING = "the benchmark ran this model with GEMM tuning off (its config: tune_gemm=0)"

_A100_7B = EngineSetup("llama-2-7b", 1, 256, kv_blocks=1000, block_tokens=128, max_prefill_token_num=4096)
_A100_20B = EngineSetup("internlm-20b", 2, 128, kv_blocks=700, block_tokens=128, max_prefill_token_num=4096)
_A100_13B = EngineSetup("llama-2-13b", 1, 128, kv_blocks=500, block_tokens=128, max_prefill_token_num=4096)
_A100_70B = EngineSetup("llama-2-70b", 4, 256, kv_blocks=4000, block_tokens=128, max_prefill_token_num=4096)


def _lmdeploy_static(batch: int, prompt: int, output: int, published: float, note: str = "") -> Row:
    return Row("lmdeploy-a100", _A100_7B, StaticRun(batch, prompt, output), OUTPUT, published, note)


FITTING: tuple[Row, ...] = (
    Row("lmdeploy-a100", _A100_7B, ShareGptRun(3000, 256), RPS, 14.556),
    Row("lmdeploy-a100", _A100_7B, ShareGptRun(3000, 256), OUTPUT, 3387.419),
    Row("lmdeploy-a100", _A100_7B, ShareGptRun(3000, 256), FTL, 0.526, _QUEUEING),
    Row("lmdeploy-a100", _A100_20B, ShareGptRun(3000, 128, INTERNLM_MEANS), RPS, 10.291),
    Row("lmdeploy-a100", _A100_20B, ShareGptRun(3000, 128, INTERNLM_MEANS), OUTPUT, 2053.266),
    Row("lmdeploy-a100", _A100_20B, ShareGptRun(3000, 128, INTERNLM_MEANS), FTL, 0.287, _QUEUEING),
    _lmdeploy_static(1, 1, 128, 100.02),
    _lmdeploy_static(16, 1, 128, 1504.72),
    _lmdeploy_static(32, 1, 128, 2136.73, "out of line: its step (15.0 ms) is batch 64's; per-token p50 11 ms"),
    _lmdeploy_static(64, 1, 128, 4154.81, "per-token p50 12 ms, the throughput implies 15.4 ms (client gaps)"),
    _lmdeploy_static(64, 2048, 2048, 755.65),
)

_KVQ_7B = EngineSetup("llama-2-7b", 1, 256)
_KVQ_13B = EngineSetup("llama-2-13b", 1, 256, cache_max_entry_count=0.9)
_KVQ_INTERNLM2 = EngineSetup("internlm2-chat-7b", 1, 256, session_len=32768)
_KVQ_RUN = ShareGptRun(10_000, 256)
_INTERNLM2_NOTE = "token counts assumed to be the InternLM-20B row's (InternLM tokenizer)"

_TRT_7B = "LLaMA-7B (Llama-2-7B's shape); TensorRT-LLM kernels and static batching"


def _trt_static(model: str, tp: int, batch: int, prompt: int, output: int, rounds: int = 1) -> tuple[
        EngineSetup, StaticRun]:
    """A static batch of TensorRT-LLM's benchmark: its KV cache holds the whole batch (it is sized for it)."""
    blocks = batch * -(-(prompt + output) // 64)
    return EngineSetup(model, tp, batch, kv_blocks=blocks), StaticRun(batch, prompt, output, rounds)


VALIDATION: tuple[Row, ...] = (
    Row("lmdeploy-a100", _A100_13B, ShareGptRun(3000, 128), RPS, 7.950),
    Row("lmdeploy-a100", _A100_13B, ShareGptRun(3000, 128), FTL, 0.352, _QUEUEING),
    Row("lmdeploy-a100", _A100_70B, ShareGptRun(3000, 256), RPS, 7.231, _NO_GEMM_TUNING),
    Row("lmdeploy-a100", _A100_70B, ShareGptRun(3000, 256), FTL, 1.075, _QUEUEING),
    _lmdeploy_static(1, 128, 128, 102.21),
    _lmdeploy_static(1, 128, 2048, 98.92),
    _lmdeploy_static(1, 2048, 128, 86.1),
    _lmdeploy_static(1, 2048, 2048, 93.78),
    _lmdeploy_static(16, 128, 128, 1272.47),
    _lmdeploy_static(16, 128, 2048, 1010.62),
    _lmdeploy_static(16, 2048, 128, 348.87, "v0.2.0 prefilled these prompts at 0.22 s each, one alone in 0.139 s"),
    _lmdeploy_static(16, 2048, 2048, 601.63),
    _lmdeploy_static(32, 128, 128, 2125.47),
    _lmdeploy_static(32, 128, 2048, 1462.12),
    _lmdeploy_static(32, 2048, 128, 450.43),
    _lmdeploy_static(32, 2048, 2048, 733.34),
    _lmdeploy_static(64, 128, 128, 3024.07),
    _lmdeploy_static(64, 128, 2048, 1852.06),
    _lmdeploy_static(64, 2048, 128, 493.46),
    Row("lmdeploy-a100", _A100_7B, StaticRun(1, 128, 128), FTL, 0.022,
        "TensorRT-LLM's figure for the same prefill is 16 ms (below)"),
    Row("lmdeploy-a100", _A100_7B, StaticRun(1, 2048, 128), FTL, 0.139),
    Row("lmdeploy-kvquant", _KVQ_7B, _KVQ_RUN, RPS, 14.98, _KV_BOUND),
    Row("lmdeploy-kvquant", EngineSetup("llama-2-7b", 1, 256, quant_policy=8), _KVQ_RUN, RPS, 19.01),
    Row("lmdeploy-kvquant", EngineSetup("llama-2-7b", 1, 256, quant_policy=4), _KVQ_RUN, RPS, 20.81),
    Row("lmdeploy-kvquant", EngineSetup("llama-2-13b", 1, 128, cache_max_entry_count=0.9), ShareGptRun(10_000, 128),
        RPS, 8.55, _KV_BOUND),
    Row("lmdeploy-kvquant", EngineSetup("llama-2-13b", 1, 256, cache_max_entry_count=0.9, quant_policy=8),
        _KVQ_RUN, RPS, 10.96),
    Row("lmdeploy-kvquant", EngineSetup("llama-2-13b", 1, 256, cache_max_entry_count=0.9, quant_policy=4),
        _KVQ_RUN, RPS, 11.91),
    Row("lmdeploy-kvquant", _KVQ_INTERNLM2, ShareGptRun(10_000, 256, INTERNLM_MEANS), RPS, 24.13, _INTERNLM2_NOTE),
    Row("lmdeploy-kvquant", EngineSetup("internlm2-chat-7b", 1, 256, session_len=32768, quant_policy=8),
        ShareGptRun(10_000, 256, INTERNLM_MEANS), RPS, 25.28, _INTERNLM2_NOTE),
    Row("lmdeploy-kvquant", EngineSetup("internlm2-chat-7b", 1, 256, session_len=32768, quant_policy=4),
        ShareGptRun(10_000, 256, INTERNLM_MEANS), RPS, 25.80, _INTERNLM2_NOTE),
    Row("trtllm-a100", *_trt_static("llama-2-7b", 1, 384, 128, 128), OUTPUT, 5586, _TRT_7B),
    Row("trtllm-a100", *_trt_static("llama-2-7b", 1, 60, 128, 2048), OUTPUT, 1928, _TRT_7B),
    Row("trtllm-a100", *_trt_static("llama-2-7b", 1, 52, 2048, 128), OUTPUT, 591, _TRT_7B),
    Row("trtllm-a100", *_trt_static("llama-2-7b", 1, 1, 128, 1), FTL, 0.016, _TRT_7B),
    Row("trtllm-a100", *_trt_static("llama-2-7b", 1, 1, 2048, 1), FTL, 0.133, _TRT_7B),
    Row("trtllm-a100", *_trt_static("llama-2-70b", 4, 1, 128, 1), FTL, 0.047, "TensorRT-LLM kernels; TP 4"),
    Row("trtllm-a100", *_trt_static("llama-2-70b", 4, 1, 2048, 1), FTL, 0.377, "TensorRT-LLM kernels; TP 4"),
)
