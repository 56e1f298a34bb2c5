"""`unidiff distill-backbone`: trajectories as token shards read back by the loader, compressed transitions whose input
is a state the sampler visited and whose targets are the tokens it revealed later, resume, and dParallel's
certainty forcing (the CAP term) lowering the entropy of masked predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from training.config import load_config
from training.tracking import read_metrics

TINY = ROOT / "configs/model/tiny.yaml"
SPECIALS = {"mask": 2047, "eos": 1, "image_start": 2, "image_end": 3, "boi": 4, "uncondition": 5, "role_start": 6,
            "role_end": 7, "pad": 1, "grid_ids": []}
VOCAB = {"image_token_offset": 2048, "vocab_size": 2304, "codebook_size": 256, "text_vocab_size": 2048}
COMMON = ["train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.save_every=0",
          "train.precision=fp32", "train.warmup_steps=1", "train.decay_steps=1", "tracking.wandb=disabled"]
BLOCK, STEPS, GEN = 8, 4, 16


def accept_all(prompt, answer, reference) -> bool:
    """A pluggable verifier (distill_backbone.verifier=module:function): the random test model answers nothing right."""
    return True


def _source(path):
    """8 single-turn prompt / answer pairs (prompts of 5 and 9 tokens) + 1 prompt-only sample, as token shards."""
    from training.backbone_distill.trajectories import write_token_dir

    rng = np.random.default_rng(0)
    samples = []
    for i in range(9):
        plen = 5 if i % 2 else 9
        ids = rng.integers(10, 2000, plen + (6 if i < 8 else 0)).astype(np.int32)
        if i < 8:
            ids[-1] = SPECIALS["eos"]
        samples.append((f"s{i}", ids, np.arange(len(ids)) >= plen, np.zeros(len(ids), np.uint8)))
    write_token_dir(path, samples, [], len(samples), {"vocab": VOCAB, "specials": SPECIALS, "fingerprint": {}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A token dir of prompts and a one-step checkpoint of the tiny model to sample trajectories from."""
    from training.trainer import train

    tmp = tmp_path_factory.mktemp("distill_backbone")
    _source(tmp / "src")
    train(load_config(TINY, [*COMMON, "data.synthetic=true", "train.steps=1", f"run.dir={tmp}", "run.name=base"]))
    return tmp


def _cfg(world, name, *extra):
    return load_config(TINY, [*COMMON, f"run.dir={world}", f"run.name={name}", f"data.token_dir={world / 'src'}",
                              "data.synthetic=false", "train.steps=4", f"diffusion.block_schedule=[[0,{BLOCK}]]",
                              f"diffusion.sample_block_length={BLOCK}", f"diffusion.sample_steps={STEPS}",
                              f"diffusion.sample_gen_length={GEN}", "diffusion.sample_threshold=0.9",
                              "distill_backbone.method=path", "distill_backbone.batch_size=1",
                              "distill_backbone.verifier=tests.test_backbone_distill:accept_all",
                              f"distill_backbone.checkpoint={world / 'base/checkpoints/step_000001'}", *extra])


class _Recorder(torch.nn.Module):
    """The model with every forward's input ids kept: the sampler's own states, seen from the model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, **kw):
        self.inputs.append(kw["input_ids"].clone())
        return self.model(**kw)


def _sampler_states(cfg, prompt):
    """{block index: the block's token states the sampler fed to the model, in order}, and its result."""
    from training.diffusion.samplers import SamplerSettings, generate_text
    from training.inference.backbone import load_backbone

    model, _ = load_backbone(cfg, cfg.distill_backbone.checkpoint, device="cpu", dtype=torch.float32)
    rec = _Recorder(model)
    res = generate_text(rec, [prompt], SamplerSettings.from_config(cfg.diffusion), mask_id=SPECIALS["mask"],
                        eos_id=SPECIALS["eos"], device="cpu")
    total, b = len(prompt) + GEN, len(prompt) // BLOCK
    states: dict[int, list] = {}
    # skip the prefill of the full prompt blocks; a forward longer than a block is the next block's first (the
    # finished one rides along in it)
    for i, x in enumerate(rec.inputs[1 if len(prompt) >= BLOCK else 0:]):
        b += int(i > 0 and x.shape[1] > BLOCK)
        s, e = b * BLOCK, min((b + 1) * BLOCK, total)
        states.setdefault(b, []).append(x[0, -(e - s):])
    return states, res


@pytest.mark.unit
def test_trajectories_are_token_shards_and_transitions_start_from_sampler_states(world):
    from data_pipeline.loader import build_loader
    from data_pipeline.token_shards import TokenShards
    from training.backbone_distill.stage import prepare
    from training.diffusion import corrupt

    cfg = _cfg(world, "shards")
    run = prepare(cfg)
    traj = TokenShards(run.data.token_dir, "train")
    split = traj.manifest["splits"]["train"]
    assert (split["inputs"], split["ok"], split["quarantine_reasons"]) == (9, 8, {"not_single_turn": 1})
    stored = {}
    for i in range(len(traj)):
        ids, order, _ = traj.read(i)
        plen = int(np.argmax(order > 0))
        states, res = _sampler_states(cfg, ids[:plen].tolist())
        assert ids[plen:].tolist() == res.tokens[0, :len(ids) - plen].tolist()  # the sampler's own answer
        assert set(order[plen:].tolist()) <= set(range(1, STEPS + 1)) and order[:plen].max() == 0
        stored[i] = (ids, order, states)
    loader = build_loader(run, seq_len=64, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, block_size=BLOCK,
                          global_batch_size=4)
    specials = loader.specials_for(run.model)
    gen = torch.Generator().manual_seed(0)
    mask, docs, partial = SPECIALS["mask"], 0, 0
    for _, batch in zip(range(2), iter(loader)):
        noised = corrupt(batch, run.diffusion, 0, specials, gen)
        for r in range(batch["input_ids"].shape[0]):
            for d in sorted(set(batch["doc_ids"][r].tolist()) - {-1}):
                where = (batch["doc_ids"][r] == d).nonzero().flatten()
                ids, order, states = stored[int(batch["sample_ids"][r, where[0]]) & ((1 << 40) - 1)]
                pos = where[:len(ids)]
                assert batch["input_ids"][r, pos].tolist() == ids.tolist()  # read back by the loader
                assert batch["reveal"][r, pos].tolist() == order.tolist()
                x_t, masked = noised["x_t"][r, pos], noised["masked"][r, pos]
                assert torch.equal(x_t == mask, masked)
                for b, seen in states.items():
                    s, e = b * BLOCK, min((b + 1) * BLOCK, len(ids))
                    # the input is a state the sampler was in; its targets, the masked positions, are exactly
                    # the tokens it revealed at later steps (they hold the sampler's final tokens, read back above)
                    assert any(torch.equal(x_t[s:e], st[:e - s]) for st in seen), (b, x_t[s:e], seen)
                    partial += int(0 < int(masked[s:e].sum()) < int((torch.as_tensor(order[s:e]) > 0).sum()))
                docs += 1
    assert docs >= 4 and partial >= 2  # not only the all-masked start of each block


@pytest.mark.unit
def test_the_stage_resumes_exactly(world):
    from training.backbone_distill.stage import distill_backbone

    traj = f"distill_backbone.trajectories={world / 'shared_traj'}"
    distill_backbone(_cfg(world, "whole", traj))
    distill_backbone(_cfg(world, "split", traj, "train.stop_after=2"))
    assert [r["step"] for r in read_metrics(world / "split")] == [0, 1]
    distill_backbone(_cfg(world, "split", traj))  # trajectories reused, the trainer resumes at step 2
    whole = {r["step"]: r["loss"] for r in read_metrics(world / "whole")}
    split = {r["step"]: r["loss"] for r in read_metrics(world / "split")}
    assert sorted(whole) == [0, 1, 2, 3] and split == whole


def _masked_entropy(cfg) -> float:
    """Mean predictive entropy at masked positions predicted correctly, on fixed synthetic batches."""
    import dataclasses

    from data_pipeline.loader import build_loader
    from data_pipeline.text_tokenizer import specials_for
    from training.diffusion import diffusion_loss
    from training.inference.backbone import load_backbone

    model, _ = load_backbone(cfg, "", device="cpu", dtype=torch.float32)
    loader = build_loader(cfg, seq_len=64, micro_batch_size=4, dp_rank=0, dp_size=1, seed=123, block_size=16)
    probe = dataclasses.replace(cfg.diffusion, cap_lambda=1e-9)  # computes the entropy, adds nothing
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        values = [diffusion_loss(model, b, probe, 0, specials_for(cfg), gen)[1]["cap_entropy"]
                  for _, b in zip(range(3), iter(loader))]
    return float(torch.stack(values).mean())


@pytest.mark.unit
def test_certainty_forcing_lowers_the_entropy_of_masked_predictions(tmp_path):
    from training.backbone_distill.stage import distill_backbone, prepare

    entropy = {}
    for beta in (0.0, 2.0):
        cfg = load_config(TINY, [*COMMON, "data.synthetic=true", "train.steps=30", "train.lr=3e-3",
                                 "diffusion.block_schedule=[[0,16]]", f"run.dir={tmp_path}", f"run.name=b{beta}",
                                 "distill_backbone.method=dparallel", f"distill_backbone.confidence_beta={beta}"])
        assert prepare(cfg).diffusion.cap_lambda == beta and cfg.diffusion.cap_lambda == 0.0
        distill_backbone(cfg)
        entropy[beta] = _masked_entropy(cfg)
    assert entropy[2.0] < 0.8 * entropy[0.0], entropy
