"""Engines on CPU: training tokens/s per engine for the tiny and a small (~100M total) MoE config, with two ratios
measured in the same run:

  * expert compute: the project's grouped path (sort by expert, one matmul per expert slice; and one
    torch._grouped_mm) against a per-expert Python loop in the style of the public reference modeling code
    (a boolean mask per expert, torch.where, index_add_), forward + backward, same weights and routing;
  * achieved model FLOP/s of a training step against a dense matmul of the MoE's token x hidden x expert-width
    shape timed in the same process (an achievable-peak baseline, not the vendor peak).

Each engine runs in its own process (megatron/deepspeed keep global state), single rank by default; --world 2
--expert 2 runs real expert parallelism over gloo, --expert-tensor 2 expert-tensor parallelism (native/megatron).

    python bench/bench_engines.py [--configs tiny small] [--engines native megatron deepspeed] [--steps 3]
                                  [--world 1] [--expert 1] [--expert-tensor 1] [--out bench/results/bench_engines.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# ~105M total / ~25M active parameters: 8 layers (1 dense), 16 experts top-2, hidden 512.
SMALL = ["model.vocab_size=8192", "model.image_token_offset=8000", "model.hidden_size=512",
         "model.intermediate_size=2048", "model.num_hidden_layers=8", "model.num_attention_heads=8",
         "model.num_key_value_heads=4", "model.head_dim=64", "model.num_experts=16", "model.num_experts_per_tok=2",
         "model.moe_intermediate_size=512", "model.n_group=4", "model.topk_group=2"]
SETTINGS = {"tiny": {"overrides": [], "seq": 128, "micro": 2}, "small": {"overrides": SMALL, "seq": 256, "micro": 2}}


def _cfg(name, engine, world, expert, etp=1):
    from training.config import load_config
    s = SETTINGS[name]
    return load_config(ROOT / "configs/model/tiny.yaml", [
        *s["overrides"], f"train.engine={engine}", f"parallel.expert={expert}",
        f"parallel.expert_tensor={etp}", "parallel.zero_stage=2",
        "train.precision=fp32", f"train.micro_batch_size={s['micro']}",
        f"train.global_batch_size={s['micro'] * world}", f"train.seq_len={s['seq']}"])


def step_flops(model, tokens: int, seq: int) -> float:
    """6 x active matmul params x tokens (+ attention scores): the standard training FLOP count."""
    cfg = model.config
    active = 0
    for n, p in model.named_parameters():
        if p.ndim < 2 or "word_embeddings" in n:
            continue
        if ".experts." in n:
            active += p.numel() * cfg.num_experts_per_tok // cfg.num_experts
        else:
            active += p.numel()
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * tokens  # QK^T and AV
    return 6.0 * active * tokens + 3.0 * attn


def dense_matmul_flops(tokens: int, hidden: int, inter: int, repeats: int = 20) -> float:
    import torch
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * tokens * hidden * inter / statistics.median(times)


def _engine_worker(rank, world, port, name, engine, expert, steps, out_dir, etp=1):
    port, ready = port  # the parent's rendezvous store is created after the fork (see run_engine)
    if not ready.wait(300):
        os._exit(1)
    # Every rank joins the parent's store as a client, as under torchrun's agent store.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port.value),
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"})
    if world == 1:
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
                  "TORCHELASTIC_RESTART_COUNT"):
            os.environ.pop(k)
    import torch
    import torch.nn.functional as F
    from training.engines import build_engine
    cfg = _cfg(name, engine, world, expert, etp)
    eng = build_engine(cfg)
    s = SETTINGS[name]
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.model.vocab_size, (s["micro"], s["seq"]), generator=gen)

    def one_step():
        out = eng.model(input_ids=ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
        eng.backward(loss)
        return eng.step(cfg.train.lr)

    one_step()  # warm-up
    tokens = s["micro"] * s["seq"]
    flops = step_flops(eng.unwrap(), tokens, s["seq"])
    m = cfg.model
    times, ratios, dense = [], [], []
    for _ in range(steps):
        # The dense baseline is timed right after each step, so a slow phase of a shared machine hits both;
        # medians of the per-step numbers are reported.
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
        dense.append(dense_matmul_flops(tokens, m.hidden_size, m.moe_intermediate_size))
        ratios.append(flops / times[-1] / dense[-1])
    dt = statistics.median(times)
    result = {"step_s": dt, "tokens_per_s": tokens * world / dt, "model_flops_per_s": flops * world / dt,
              "dense_matmul_flops_per_s": statistics.median(dense), "flops_ratio": statistics.median(ratios)}
    if rank == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
    os._exit(0)


def run_engine(name, engine, world, expert, steps, etp=1) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("fork")
        port = (ctx.Value("i", 0), ctx.Event())
        procs = [ctx.Process(target=_engine_worker, args=(r, world, port, name, engine, expert, steps, d, etp))
                 for r in range(world)]
        for p in procs:
            p.start()
        # The rendezvous store lives here, on a port the kernel assigns (0) and keeps bound until the ranks are done:
        # no port is picked, released and bound again later. Created after the forks: a rank forked while the
        # store's server thread serves another can inherit a lock held at that instant (tests/dist_helpers.py).
        import torch.distributed as dist
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False) if world > 1 else None
        port[0].value = store.port if store else 0
        port[1].set()
        for p in procs:
            p.join(timeout=900)
        del store
        path = Path(d) / "result.json"
        if not path.exists():
            return {"error": f"exit codes {[p.exitcode for p in procs]}"}
        return json.loads(path.read_text())


def bench_experts(name: str, repeats: int = 7) -> dict:
    """Grouped expert compute vs a reference-style per-expert loop, fwd+bwd, same weights and routing."""
    import torch
    import torch.nn.functional as F
    from training.model.moe import Experts, LocalDispatcher
    cfg = _cfg(name, "native", 1, 1).model
    s = SETTINGS[name]
    n, h, i, e, k = s["micro"] * s["seq"], cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, \
        cfg.num_experts_per_tok
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen)

    def grouped(mode):
        ex = Experts(e, h, i, mode)
        for p in ex.parameters():
            torch.nn.init.normal_(p, std=0.02, generator=gen)
        return ex

    def ours(ex, xx):
        return (LocalDispatcher()(ex, xx, idx, e).view(n, k, h) * w[..., None]).sum(1)

    def reference_loop(ex, xx):  # as in the public modeling code: a mask per expert, where, index_add_
        out = torch.zeros_like(xx)
        mask = F.one_hot(idx, e).permute(2, 1, 0)  # [E, k, N]
        for j in range(e):
            slot, tok = torch.where(mask[j])
            if tok.numel() == 0:
                continue
            cur = xx[tok]
            y = (F.silu(cur @ ex.gate_proj[j].t()) * (cur @ ex.up_proj[j].t())) @ ex.down_proj[j].t()
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out

    def timeit(fn, ex):
        xx = x.clone().requires_grad_()
        fn(ex, xx).sum().backward()
        times = []
        for _ in range(repeats):
            xx = x.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(ex, xx).sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    ex_off, ex_on = grouped("off"), grouped("on")
    with torch.no_grad():
        for a, b in zip(ex_on.parameters(), ex_off.parameters()):
            a.copy_(b)
    with torch.no_grad():
        err = float((ours(ex_off, x) - reference_loop(ex_off, x)).abs().max())
    t_ref, t_sorted, t_gmm = timeit(reference_loop, ex_off), timeit(ours, ex_off), timeit(ours, ex_on)
    return {"tokens": n, "experts": e, "top_k": k, "max_abs_diff_vs_loop": err, "loop_s": t_ref,
            "sorted_s": t_sorted, "grouped_mm_s": t_gmm, "speedup_sorted": t_ref / t_sorted,
            "speedup_grouped_mm": t_ref / t_gmm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(SETTINGS))
    ap.add_argument("--engines", nargs="+", default=["native", "megatron", "deepspeed"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--expert", type=int, default=1)
    ap.add_argument("--expert-tensor", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/bench_engines.json"))
    args = ap.parse_args(argv)
    from tqdm import tqdm
    results = {"world": args.world, "expert": args.expert, "expert_tensor": args.expert_tensor, "engines": {},
               "experts": {}}
    jobs = [(c, e) for c in args.configs for e in args.engines]
    for c, e in tqdm(jobs, desc="engines"):
        results["engines"][f"{c}/{e}"] = r = run_engine(c, e, args.world, args.expert, args.steps, args.expert_tensor)
        tqdm.write(f"{c:6s} {e:10s} " + (f"{r['tokens_per_s']:9.0f} tok/s  {r['model_flops_per_s'] / 1e9:7.2f} "
                                          f"GFLOP/s  = {r['flops_ratio']:.2f} x dense matmul"
                                          if "error" not in r else r["error"]))
    for c in args.configs:
        results["experts"][c] = x = bench_experts(c)
        print(f"{c:6s} experts fwd+bwd: sorted {x['speedup_sorted']:.2f}x, grouped_mm {x['speedup_grouped_mm']:.2f}x "
              f"vs per-expert loop (max diff {x['max_abs_diff_vs_loop']:.1e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    ok = [v for v in results["engines"].values() if "error" not in v]
    print(f"bench_engines: {len(ok)}/{len(jobs)} engine runs, results in {args.out}")
    return 0 if len(ok) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
