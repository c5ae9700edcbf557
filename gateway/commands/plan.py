"""List every TP size for a model, GPU type and budget, with its verdict."""

from __future__ import annotations

import argparse
import json
import os

from gateway.config import load_config
from gateway.planner import EngineKnobs, TpVerdict, find_gpu, load_model, plan

GIB = 1024**3


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
    return 0


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
