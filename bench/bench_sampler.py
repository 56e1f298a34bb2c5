"""Sampler forward passes per generated token: threshold acceptance vs the fixed schedule (baseline), measured in the
same run.

Two model kinds:
  oracle  a stand-in whose logits put probability ~1 on the right token at a chosen fraction of positions (the
          "confident" ones) and ~0.1 elsewhere, so the ratio is measured as a function of model confidence;
  tiny    the tiny LLaDA2-MoE preset (random weights: never confident, so threshold == fixed is expected) for
          wall time per token of the real cached decoder.

    python bench/bench_sampler.py [--gen-length 256] [--block 32] [--steps 32] [--out bench/results/sampler.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.diffusion.samplers import generate_text  # noqa: E402
from training.model import ModelOutput, build_model  # noqa: E402

MASK, VOCAB = 1, 64


class ConfidenceOracle(nn.Module):
    """Logits peaked on target[position]: strength 30 (p ~ 1) at confident positions, 2 (p ~ 0.1) elsewhere."""

    def __init__(self, target: torch.Tensor, confident: torch.Tensor):
        super().__init__()
        self.target, self.strength = target, torch.where(confident, 30.0, 2.0)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_kv=None, use_cache=False,
                inputs_embeds=None):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(-1, self.target[position_ids][..., None], self.strength[position_ids][..., None])
        kv = [(input_ids[:, None, :, None].float(),) * 2] if use_cache else None
        return ModelOutput(logits=logits, aux_loss=torch.zeros(()), kv=kv)


def _run(model, prompt, args, threshold, gen_length=None):
    t0 = time.perf_counter()
    res = generate_text(model, [prompt], mask_id=MASK, eos_id=None, gen_length=gen_length or args.gen_length,
                        block_length=args.block, steps=args.steps, threshold=threshold)
    return res, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=32, help="steps per block (text default 32, image default 8)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--tiny-gen-length", type=int, default=64, help="tokens for the (slow, CPU) tiny-model run")
    p.add_argument("--out", default=str(ROOT / "bench/results/sampler.json"))
    args = p.parse_args()
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(0)
    total = args.prompt_len + args.gen_length
    target = torch.randint(5, VOCAB, (total,), generator=gen)
    prompt = target[:args.prompt_len].tolist()
    rows = []
    for frac in tqdm([0.0, 0.5, 0.9, 1.0], desc="oracle confidence"):
        confident = torch.rand(total, generator=gen) < frac
        fixed, _ = _run(ConfidenceOracle(target, confident), prompt, args, 1.0)
        thr, _ = _run(ConfidenceOracle(target, confident), prompt, args, args.threshold)
        ok = thr.tokens[0].tolist() == fixed.tokens[0].tolist() == target[args.prompt_len:].tolist()
        rows.append({"model": "oracle", "confident_fraction": frac, "fixed_nfe_per_token": fixed.nfe / args.gen_length,
                     "threshold_nfe_per_token": thr.nfe / args.gen_length, "ratio": thr.nfe / fixed.nfe,
                     "reproduced_target": ok})
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["model.attention=sdpa"])
    tiny = build_model(cfg.model, seed=0).eval()
    tprompt = torch.randint(5, 2000, (args.prompt_len,), generator=gen).tolist()
    n = args.tiny_gen_length
    fixed, t_fixed = _run(tiny, tprompt, args, 1.0, n)
    thr, t_thr = _run(tiny, tprompt, args, args.threshold, n)
    rows.append({"model": "tiny-random", "gen_length": n, "fixed_nfe_per_token": fixed.nfe / n,
                 "threshold_nfe_per_token": thr.nfe / n, "ratio": thr.nfe / fixed.nfe,
                 "fixed_ms_per_token": 1e3 * t_fixed / n, "threshold_ms_per_token": 1e3 * t_thr / n})
    print(f"{'model':>12} {'confident':>9} {'fixed nfe/tok':>14} {'thresh nfe/tok':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:>12} {r.get('confident_fraction', float('nan')):>9.2f} {r['fixed_nfe_per_token']:>14.3f} "
              f"{r['threshold_nfe_per_token']:>15.3f} {r['ratio']:>7.3f}")
    result = {"baseline": "fixed schedule (threshold off)", "gen_length": args.gen_length, "block": args.block,
              "steps": args.steps, "threshold": args.threshold, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    best = min(r["ratio"] for r in rows)
    print(f"sampler bench: threshold needs {best:.3f}x the forwards of the fixed schedule at best "
          f"(all oracle runs reproduced the target: {all(r.get('reproduced_target', True) for r in rows)}); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
