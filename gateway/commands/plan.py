"""List every TP size for a model, GPU type and budget, with its verdict.

Exit status 0 when at least one TP size is feasible; 1 when none is (the table or JSON list is printed, then
one line on stderr naming the closest miss and what would make it fit); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from gateway.config import load_config
from gateway.planner import (
    EngineKnobs,
    GpuSpec,
    ModelSpec,
    TpVerdict,
    divisibility_reason,
    evaluate_tp,
    find_gpu,
    load_model,
    plan,
)
from gateway.planner.tp import RUNTIME_RESERVE_GIB

GIB = 1024**3
# The largest TP size the advice looks at when it suggests more GPUs (eight 8-GPU nodes' worth).
MAX_SUGGESTED_TP = 64
# LMDeploy's quant_policy values that store the KV cache in fewer bits than the given one, most precise first.
SMALLER_KV_POLICIES: dict[int, tuple[int, ...]] = {0: (8, 4), 8: (4,), 4: ()}
KV_PRECISION = {8: "int8", 4: "int4"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="tpgate YAML configuration (adds GPU types, sets defaults)")
    parser.add_argument("--model", help="bundled card name (internvl2_5-38b), model directory or config.json")
    parser.add_argument("--gpu", help="GPU type, e.g. h100-80gb")
    parser.add_argument("--gpus", type=int, help="GPU budget")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the whole budget)")
    parser.add_argument("--tp", type=int, action="append", help="evaluate only this TP size (repeatable)")
    parser.add_argument("--cache-max-entry-count", type=float, default=0.8)
    parser.add_argument("--quant-policy", type=int, default=0, choices=(0, 4, 8))
    parser.add_argument("--session-len", type=int, help="context length one sequence must fit")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        environ=os.environ,
        overrides={"model": args.model, "gpu": args.gpu, "gpus": args.gpus, "gpus_per_node": args.gpus_per_node},
        flag_names={"model": "--model", "gpu": "--gpu", "gpus": "--gpus", "gpus_per_node": "--gpus-per-node"},
    )
    model = load_model(config.model)
    gpu = find_gpu(config.gpu, config.catalog())
    knobs = EngineKnobs.of(
        cache_max_entry_count=args.cache_max_entry_count, quant_policy=args.quant_policy, session_len=args.session_len
    )
    verdicts = plan(model, gpu, gpus=config.gpus, gpus_per_node=config.node_size, knobs=knobs, tp_sizes=args.tp)
    if args.json:
        print(json.dumps([v.as_dict() for v in verdicts], indent=2))
    else:
        print(
            f"{model.name}: {model.param_count / 1e9:.1f}B parameters, {model.weight_bytes / GIB:.1f} GiB of weights, "
            f"{model.num_attention_heads} attention / {model.num_kv_heads} KV heads"
        )
        print(f"budget: {config.gpus} x {gpu.name} ({config.node_size} per node)\n")
        print(format_table(verdicts))
    if any(v.feasible for v in verdicts):
        return 0
    budget = Budget(gpus=config.gpus, gpus_per_node=config.node_size, knobs=knobs, catalog=config.catalog())
    print(f"tpgate: {nothing_feasible(verdicts, model, gpu, budget)}", file=sys.stderr)
    return 1


def format_table(verdicts: list[TpVerdict]) -> str:
    header = f"{'tp':>3}  {'verdict':<9} {'replicas':>8} {'weights/GPU':>12} {'KV tokens/replica':>18}  notes"
    lines = [header, "-" * len(header)]
    for v in verdicts:
        notes = "; ".join(([v.reason] if v.reason else []) + list(v.warnings))
        lines.append(
            f"{v.tp:>3}  {'feasible' if v.feasible else 'rejected':<9} {v.max_replicas:>8} "
            f"{v.weights_per_gpu_bytes / GIB:>8.1f} GiB {v.kv_cache_tokens_per_replica:>18,}  {notes}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Budget:
    """What a plan was asked for: the GPU budget, the knobs, and the GPU types one could switch to."""

    gpus: int
    gpus_per_node: int
    knobs: EngineKnobs
    catalog: Mapping[str, GpuSpec]


def nothing_feasible(verdicts: list[TpVerdict], model: ModelSpec, gpu: GpuSpec, budget: Budget) -> str:
    """One line for a plan where every TP size is rejected: the closest miss, its numbers, and what would make
    it fit. A KV cache short of one session is closer than weights that do not fit, which are closer than a TP
    size the model or the node cannot take."""
    session_len = budget.knobs.session_len_for(model)
    memory_misses = [v for v in verdicts if not _structural(v, model, budget)]
    kv_misses = [v for v in memory_misses if v.kv_cache_bytes_per_gpu > 0]
    weight_misses = [v for v in memory_misses if v.kv_cache_bytes_per_gpu == 0]
    if kv_misses:
        closest = max(kv_misses, key=lambda v: v.kv_cache_tokens_per_replica)
        tokens = closest.kv_cache_tokens_per_replica
        miss = (
            f"the closest is tp={closest.tp}, whose KV cache holds {tokens:,} tokens, {tokens / session_len:.0%} of "
            f"one {session_len:,}-token session ({closest.kv_cache_bytes_per_gpu / GIB:.1f} GiB per GPU after "
            f"{closest.weights_per_gpu_bytes / GIB:.1f} GiB of weights)"
        )
        fixes = _kv_fixes(closest, model, gpu, budget)
    elif weight_misses:
        closest = min(weight_misses, key=lambda v: v.weights_per_gpu_bytes)
        need_bytes = closest.weights_per_gpu_bytes + RUNTIME_RESERVE_GIB * GIB
        miss = (
            f"the closest is tp={closest.tp}, whose weights need {closest.weights_per_gpu_bytes / GIB:.1f} GiB per "
            f"GPU plus a {RUNTIME_RESERVE_GIB:.1f} GiB runtime reserve, {(need_bytes - gpu.memory_bytes) / GIB:.1f} "
            f"GiB more than the {gpu.memory_bytes / GIB:.1f} GiB of a {gpu.name}"
        )
        fixes = [fix for fix in (_more_gpus(closest, model, gpu, budget), _bigger_gpu(closest, model, gpu, budget))
                 if fix]
    else:
        closest = verdicts[0]
        miss = f"every TP size asked for is one the model or the nodes cannot take ({closest.reason})"
        asked = {v.tp for v in verdicts}
        unasked = (tp for tp in range(1, MAX_SUGGESTED_TP + 1) if tp not in asked)
        other = _other_tp(model, gpu, budget, candidates=unasked)
        fixes = [other] if other else []
    if not fixes:
        return f"nothing feasible: {miss}; no change within {MAX_SUGGESTED_TP} GPUs or the known GPU types fits it"
    return f"nothing feasible: {miss}; it would fit with {_either(fixes)}"


def _structural(verdict: TpVerdict, model: ModelSpec, budget: Budget) -> bool:
    """Whether no amount of memory would help this TP size: the node is too small or the heads do not split."""
    return verdict.tp > budget.gpus_per_node or divisibility_reason(model, verdict.tp) is not None


def _kv_fixes(closest: TpVerdict, model: ModelSpec, gpu: GpuSpec, budget: Budget) -> list[str]:
    knobs = budget.knobs
    fixes = [f"fewer tokens per session (--session-len {closest.kv_cache_tokens_per_replica} or less)"]
    for policy in SMALLER_KV_POLICIES[knobs.quant_policy]:
        quantized = _evaluate(model, gpu, closest.tp, budget, knobs.model_copy(update={"quant_policy": policy}))
        if quantized.feasible:
            name = KV_PRECISION[policy]
            fixes.append(f"KV {name} ({quantized.kv_cache_tokens_per_replica:,} tokens: --quant-policy {policy})")
            break
    share = -(-knobs.cache_max_entry_count * knobs.session_len_for(model) * 100
              // max(closest.kv_cache_tokens_per_replica, 1)) / 100
    if share <= 1:
        larger = _evaluate(model, gpu, closest.tp, budget, knobs.model_copy(update={"cache_max_entry_count": share}))
        if larger.feasible:
            fixes.append(f"a larger KV share (--cache-max-entry-count {share:g})")
    return fixes + [fix for fix in (_more_gpus(closest, model, gpu, budget), _bigger_gpu(closest, model, gpu, budget))
                    if fix]


def _more_gpus(closest: TpVerdict, model: ModelSpec, gpu: GpuSpec, budget: Budget) -> str | None:
    """The smallest larger TP size that would be feasible, and the flags it takes."""
    return _other_tp(model, gpu, budget, candidates=range(closest.tp + 1, MAX_SUGGESTED_TP + 1))


def _other_tp(model: ModelSpec, gpu: GpuSpec, budget: Budget, *, candidates: Iterable[int]) -> str | None:
    """The first TP size among ``candidates`` that would be feasible given enough GPUs, and how to ask for it."""
    for tp in candidates:
        if divisibility_reason(model, tp) is not None:
            continue
        wider = replace(budget, gpus=max(tp, budget.gpus), gpus_per_node=max(tp, budget.gpus_per_node))
        if not _evaluate(model, gpu, tp, wider, budget.knobs).feasible:
            continue
        if tp <= budget.gpus_per_node:  # within the budget: a TP size that was not asked for
            return f"tp={tp} (--tp {tp})"
        if tp <= budget.gpus:
            return f"nodes of {tp} GPUs (tp={tp}: --gpus-per-node {tp})"
        flags = f"--gpus {tp}" if budget.gpus_per_node == budget.gpus else f"--gpus {tp} --gpus-per-node {tp}"
        return f"more GPUs (tp={tp}: {flags})"
    return None


def _bigger_gpu(closest: TpVerdict, model: ModelSpec, gpu: GpuSpec, budget: Budget) -> str | None:
    """The GPU type with the least memory above this one on which the same TP size would be feasible."""
    for other in sorted(budget.catalog.values(), key=lambda g: g.memory_mib):
        if other.memory_mib > gpu.memory_mib and _evaluate(model, other, closest.tp, budget, budget.knobs).feasible:
            return f"a GPU with more memory ({other.memory_bytes / GIB:.0f} GiB: --gpu {other.name})"
    return None


def _evaluate(model: ModelSpec, gpu: GpuSpec, tp: int, budget: Budget, knobs: EngineKnobs) -> TpVerdict:
    return evaluate_tp(model, gpu, tp, gpus=budget.gpus, gpus_per_node=budget.gpus_per_node, knobs=knobs)


def _either(fixes: list[str]) -> str:
    return fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
