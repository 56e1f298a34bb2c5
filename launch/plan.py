"""`unidiff plan CONFIG --nodes N --gpus-per-node G [--engine E] [--rank R] [--json] [k=v ...]`: one rank of the real
GPU job, rehearsed on this CPU (training/rehearsal/: fake tensors, a fake process group of N x G ranks).

Two child processes run the passes side by side (device: fake cuda, forward, every collective and host sync; memory:
fake cpu, forward + backward + optimizer step) and this process joins their figures with the GPU's numbers from the
config (launch.gpu_memory_bytes, launch.*_bytes_per_s, train.peak_flops) into per-GPU memory, FLOPs, collectives,
a lower bound on the step time and an upper bound on MFU. Exit code 1 when a device violation was found.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from launch.config import redact_override
from training.config import ConfigError, load_config

GiB = 2**30
# Ring algorithms move this many times the payload per rank (n ranks): the bus-bandwidth factors of nccl-tests.
_FACTOR = {"allreduce": lambda n: 2 * (n - 1) / n, "alltoall_base": lambda n: (n - 1) / n,
           "_allgather_base": lambda n: (n - 1) / n, "allgather": lambda n: (n - 1) / n,
           "_reduce_scatter_base": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n}


def add_flags(p) -> None:
    p.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--engine", choices=["native", "megatron", "deepspeed"], help="default: train.engine")
    p.add_argument("--rank", type=int, default=0, help="the rank to rehearse (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _overrides(args, engine: str) -> list[str]:
    words = [redact_override(w) for w in args.overrides]  # the rehearsal needs no secret on its command line
    # FlexAttention cannot execute on fake tensors in the CPU build (no CPU backward; its fake cuda kernel needs a
    # GPU): the rehearsal runs the dense-SDPA path, whose fused kernel saves the same tensors for the backward.
    return [*words, f"train.engine={engine}", "model.attention=sdpa"]


def _run_pass(which: str, cfg_path: str, overrides: list[str], rank: int, world: int, gpn: int):
    cmd = [sys.executable, "-m", "training.rehearsal.passes", which, str(rank), str(world), str(gpn), cfg_path,
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(proc, which: str) -> dict:
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("REHEARSAL "):
            return json.loads(line[len("REHEARSAL "):])
    tail = "\n".join((err or out).strip().splitlines()[-15:])
    raise RuntimeError(f"the {which} pass of the rehearsal failed (exit {proc.returncode}):\n{tail}")


def _group_span(label: str, layout: dict, gpn: int) -> str:
    """intra | inter: whether the group's ranks share a node (world.py's layout puts tp/etp/ep neighbours first)."""
    w, tp, ep, etp = layout["world_size"], layout["tensor"], layout["expert"], layout["expert_tensor"]
    span = {"tp": tp, "etp": etp, "ep": ep * etp, "dp": w, "edp": w, "world": w}  # rank distance spanned
    base = label.split("|")[0]
    return "intra" if span.get(base, w) <= gpn and (base not in ("dp", "edp", "world") or w <= gpn) else "inter"


def _group_size(label: str, layout: dict) -> int:
    w = layout["world_size"]
    return {"tp": layout["tensor"], "ep": layout["expert"], "etp": layout["expert_tensor"], "dp": layout["data"],
            "edp": w // (layout["expert"] * layout["expert_tensor"]), "world": w}.get(label.split("|")[0], w)


def summarize(cfg, dev: dict, mem: dict, nodes: int, gpn: int, rank: int) -> dict:
    lc = cfg.launch
    layout = dev["layout"]
    peak = int(mem["peak_bytes"])
    flops = int(mem["flops_per_micro_batch"]) * int(dev["micro_batches"])
    comm_s, table = 0.0, {}
    per_step = {k: dict(v) for k, v in dev["collectives"].items()}  # forward of every micro-batch + the step
    for key, st in mem["backward_collectives"].items():  # + the backward of every micro-batch
        acc = per_step.setdefault(key, {"calls": 0, "bytes": 0})
        acc["calls"] += st["calls"] * int(dev["micro_batches"])
        acc["bytes"] += st["bytes"] * int(dev["micro_batches"])
    for key, st in per_step.items():
        label, op = key.split(":")
        n = _group_size(label, layout)
        span = _group_span(label, layout, gpn)
        bw = lc.intra_node_bytes_per_s if span == "intra" else lc.inter_node_bytes_per_s
        seconds = st["bytes"] * _FACTOR.get(op, lambda n: 1.0)(max(n, 1)) / bw if n > 1 else 0.0
        comm_s += seconds
        table[key] = {**st, "group_size": n, "link": span, "seconds_lower_bound": seconds}
    from training.trainer import flops_per_token
    seq = cfg.train.seq_len
    # Model FLOPs (the trainer's MFU formula: no recomputation) per GPU; `flops` is what the GPU executes.
    model_flops = flops_per_token(cfg.model, seq, 0 < mem["block_size"] < seq,
                                  mem["masked_tokens"] / max(mem["tokens_per_micro_batch"], 1)) \
        * int(dev["tokens_per_step"]) / (nodes * gpn)
    compute_s = flops / cfg.train.peak_flops
    # The expert all-to-all is synchronous inside each layer; the gradient reduction may overlap the backward
    # (train.overlap_grad_reduce, megatron / DeepSpeed), which is not credited: the figure is compute at peak plus
    # traffic at link speed, as if nothing overlapped.
    step_s = compute_s + comm_s
    budget = lc.gpu_memory_bytes - lc.gpu_memory_reserve_bytes
    return {"fits": peak <= budget, "peak_bytes_per_gpu": peak, "gpu_memory_bytes": lc.gpu_memory_bytes,
            "gpu_memory_budget_bytes": budget, "memory_breakdown": mem["peak_by_category"],
            "device_violations": int(dev["device_violations"]), "violations": dev["violations"],
            "flops_per_step": flops, "tokens_per_step": int(dev["tokens_per_step"]),
            "micro_batches_per_step": int(dev["micro_batches"]), "block_size": mem["block_size"],
            "masked_fraction": mem["masked_tokens"] / max(mem["tokens_per_micro_batch"], 1), "host_syncs_per_step": int(dev["host_syncs"]),
            "host_sync_sites": dev["host_sync_sites"], "standins": dev["standins"], "collectives": table,
            "step_seconds_lower_bound": step_s, "compute_seconds": compute_s, "comm_seconds_lower_bound": comm_s,
            "model_flops_per_step": int(model_flops),
            "mfu_upper_bound": model_flops / (step_s * cfg.train.peak_flops) if step_s > 0 else 0.0,
            "params_local": mem["params_local"],
            "checkpoint_bytes_per_rank": mem["checkpoint_bytes"], "world_size": nodes * gpn, "nodes": nodes,
            "gpus_per_node": gpn, "rank": rank, "engine": layout["engine"], "layout": layout,
            "attention_rehearsed": "sdpa (FlexAttention cannot run on fake tensors in a CPU build)"}


def _human(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def print_report(r: dict) -> None:
    lay = r["layout"]
    print(f"unidiff plan: rank {r['rank']} of {r['world_size']} ({r['nodes']} node(s) x {r['gpus_per_node']} GPUs), "
          f"engine {r['engine']}, tp={lay['tensor']} ep={lay['expert']} etp={lay['expert_tensor']} dp={lay['data']}")
    print(f"  peak memory per GPU   {_human(r['peak_bytes_per_gpu'])} of a {_human(r['gpu_memory_budget_bytes'])} "
          f"budget ({_human(r['gpu_memory_bytes'])} - reserve): {'fits' if r['fits'] else 'DOES NOT FIT'}")
    for k, v in sorted(r["memory_breakdown"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:<8} {_human(v)}")
    print(f"  params on this rank   {r['params_local'] / 1e9:.3f} B; checkpoint shard {_human(r['checkpoint_bytes_per_rank'])}")
    print(f"  tokens per step       {r['tokens_per_step']} ({r['micro_batches_per_step']} micro-batches per rank)")
    print(f"  FLOPs per step (GPU)  {r['flops_per_step']:.3e} executed, {r['model_flops_per_step']:.3e} model "
          "(no recomputation)")
    print(f"  host syncs per step   {r['host_syncs_per_step']}")
    for site, n in list(r["host_sync_sites"].items())[:6]:
        print(f"    {n:>4} x {site[:110]}")
    print("  collectives per step (bytes per group)")
    for key, st in sorted(r["collectives"].items()):
        print(f"    {key:<24} {st['calls']:>5} calls {st['bytes'] / 2**20:>10.1f} MiB  {st['link']}"
              f"  >= {st['seconds_lower_bound'] * 1e3:.2f} ms")
    print(f"  step time >= {r['step_seconds_lower_bound'] * 1e3:.1f} ms (compute {r['compute_seconds'] * 1e3:.1f} ms at "
          f"peak, communication {r['comm_seconds_lower_bound'] * 1e3:.1f} ms), MFU <= {r['mfu_upper_bound']:.1%}")
    print(f"  device violations     {r['device_violations']}")
    for v in r["violations"][:10]:
        print(f"    {v['what']}: {v['detail']}\n      at {v['where']}")


def cmd_plan(cfg, args) -> int:
    engine = args.engine or cfg.train.engine
    nodes, gpn = args.nodes, args.gpus_per_node
    if nodes < 1 or gpn < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpn}: both must be >= 1")
    world = nodes * gpn
    if not 0 <= args.rank < world:
        raise ConfigError(f"--rank {args.rank} is not allowed: must be in [0, {world})")
    if engine == "deepspeed":
        raise ConfigError("unidiff plan --engine deepspeed is not supported: DeepSpeed picks its accelerator at import "
                          "(DS_ACCELERATOR) and its CUDA accelerator calls torch.cuda's runtime (streams, "
                          "device count, memory stats) that a CPU build has no fake for, while its CPU accelerator "
                          "would rehearse gloo on cpu, not NCCL on cuda; rehearse with --engine native or megatron "
                          "(same model, sharding and objective), see docs/scale.md")
    if not args.config:
        raise ConfigError("unidiff plan needs a CONFIG.yaml (e.g. configs/model/llada2_mini.yaml)")
    overrides = _overrides(args, engine)
    cfg = load_config(args.config, overrides)  # fail on a bad layout before starting any child
    from training.engines.world import check_layout
    check_layout(cfg, world, nodes)
    procs = {w: _run_pass(w, args.config, overrides, args.rank, world, gpn) for w in ("device", "memory")}
    dev, mem = _collect(procs["device"], "device"), _collect(procs["memory"], "memory")
    report = summarize(cfg, dev, mem, nodes, gpn, args.rank)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if report["device_violations"] else 0
