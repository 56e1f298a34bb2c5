"""Each task on reference models with known answers: an oracle scores 100%, a uniform model scores chance (choice)
or nothing (generation), and every task reports its baseline."""
from __future__ import annotations

import pytest
import torch

from evals.reference_models import UniformModel
from tests import evals_fixtures as fx

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("evtok"))
    ho = fx.heldout(tmp, 6)
    return tmp, ho, fx.oracle_model(tmp, ho)


def test_choice_oracle_perfect_uniform_exactly_chance(env):
    from evals.heldout import ChoiceItem
    from evals.tasks.choice import ChoiceTask

    tmp, ho, oracle = env
    # With stratified l and mc >= answer length, the last stratum masks the whole answer, so every wrong
    # candidate's differing token is scored at least once.
    r = ChoiceTask().run(fx.context(tmp, oracle, ho, choice_mc=4))
    assert r.status == "ok" and r.scores["accuracy"] == 1.0
    # Equal-length candidates: a uniform model ties them all, so it earns exactly the chance level.
    _, specials, _ = fx.tokenizers(tmp)
    items = [ChoiceItem([5, 6, 7 + i], [[100 + k, specials.eos] for k in range(k_)], i % k_, "t", i)
             for i, k_ in enumerate([2, 3, 4, 2])]
    ho2 = type(ho)(choice=items)
    u = ChoiceTask().run(fx.context(tmp, UniformModel(2304), ho2, choice_mc=2))
    chance = sum(1 / k for k in (2, 3, 4, 2)) / 4
    assert u.scores["accuracy"] == pytest.approx(chance) and u.baselines["accuracy"] == pytest.approx(chance)


def test_vqa_and_caption_oracle_perfect_uniform_zero(env):
    from evals.tasks.vqa import CaptionTask, VQATask

    tmp, ho, oracle = env
    r = VQATask().run(fx.context(tmp, oracle, ho))
    assert r.status == "ok" and r.scores["accuracy"] == 1.0, r.samples
    assert 0 < r.baselines["accuracy"] < 1 and {row["type"] for row in r.tables["per_type"]}
    c = CaptionTask().run(fx.context(tmp, oracle, ho))
    assert c.scores["f1"] == 1.0 and c.scores["exact"] == 1.0
    assert 0 < c.baselines["f1"] < 1  # the template alone overlaps, but not fully
    u = VQATask().run(fx.context(tmp, UniformModel(2304), ho, vqa_gen_length=4))
    assert u.scores["accuracy"] == 0.0


def test_controls_answer_prior_and_image_blind(env):
    from evals.controls import answer_prior, blind_prompt, blinded
    from evals.tasks.choice import ChoiceTask
    from evals.tasks.vqa import CaptionTask, VQATask

    tmp, ho, oracle = env
    _, specials, _ = fx.tokenizers(tmp)
    ctx = fx.context(tmp, oracle, ho, choice_mc=4)
    prompt = ho.vqa[0].prompt
    image = [i for i, t in enumerate(prompt) if 2048 <= t < 2304]
    b = blind_prompt(prompt, 2048, 256, specials.mask)
    assert image and len(b) == len(prompt) and all(b[i] == specials.mask for i in image)
    assert all(x == y for i, (x, y) in enumerate(zip(b, prompt)) if i not in image)  # the frame and text stay
    assert blinded(ctx, ho.vqa[:1])[0].prompt == b and ho.vqa[0].prompt == prompt  # copies, the items unchanged
    assert answer_prior(["a", "a", "b", "c", "c", "c"], ["x", "x", "x", "y", "y", "z"]) == (
        pytest.approx(5 / 6), {"x": pytest.approx(2 / 3), "y": 1.0, "z": 1.0})
    # the oracle reads the image: blind, every caption prompt is the same, so at most one caption comes out right
    c = CaptionTask().run(ctx)
    assert c.scores["f1"] == 1.0 and c.baselines["image_blind"] < 0.9 and "answer_prior" in c.baselines
    for task in (VQATask(), ChoiceTask()):
        r = task.run(ctx)
        assert r.baselines["image_blind"] <= r.scores["accuracy"] and 0 < r.baselines["answer_prior"] <= 1
        assert all({"answer_prior", "image_blind", "chance"} <= set(row) for row in r.tables["per_type"])
    # a model that ignores the image scores the same blind; the control is off when asked
    u = VQATask().run(fx.context(tmp, UniformModel(2304), ho, vqa_gen_length=4))
    assert u.baselines["image_blind"] == u.scores["accuracy"] == 0.0
    off = VQATask().run(fx.context(tmp, UniformModel(2304), ho, vqa_gen_length=4, image_blind=False))
    assert "image_blind" not in off.baselines


def test_t2i_oracle_reaches_detector_ceiling(env, tmp_path):
    from evals.tasks.t2i import T2ITask

    tmp, ho, oracle = env
    ctx = fx.context(tmp, oracle, ho, decoders={"oracle": fx.oracle_decoder(ho)}, t2i_cfg_scale=2.0)
    ctx.out_dir = tmp_path
    r = T2ITask().run(ctx)
    assert r.status == "ok"
    assert r.scores["oracle/overall"] == pytest.approx(r.baselines["detector_ceiling/overall"])
    assert r.scores["oracle/exact"] == 1.0  # the detector recovers every rendered scene
    assert r.baselines["wrong_prompt/overall"] < 0.9
    assert (tmp_path / "t2i_oracle.png").exists()
    # A decoder that returns white images finds nothing: every category is 0 except the count of... none.
    blank = fx.context(tmp, oracle, ho, decoders={"blank": lambda ids: torch.ones(ids.shape[0], 3, 64, 64)})
    assert T2ITask().run(blank).scores["blank/position"] == 0.0


def test_reconstruction_exact_decoder_and_flat_baseline(env, tmp_path):
    from evals.tasks.reconstruction import ReconstructionTask

    tmp, ho, oracle = env
    dec = fx.oracle_decoder(ho)
    noisy = lambda ids: (dec(ids) + 0.1 * torch.randn(ids.shape[0], 3, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)  # noqa: E731
    ctx = fx.context(tmp, None, ho, decoders={"teacher": dec, "student": noisy})
    ctx.out_dir = tmp_path
    r = ReconstructionTask().run(ctx)
    assert r.scores["teacher/ssim"] == pytest.approx(1.0) and r.scores["teacher/psnr"] >= 99
    assert r.baselines["flat/psnr"] < r.scores["student/psnr"] < r.scores["teacher/psnr"]
    # Gaussian noise of std 0.1 on a [-1, 1] image: PSNR = 10 log10(2^2 / 0.01) ~ 26 dB (a bit more where clamped).
    assert 25 < r.scores["student_vs_teacher/psnr"] < 29
    assert (tmp_path / "reconstruction.png").exists()


def test_tokens_per_forward_is_answer_tokens_over_denoising_forwards(env):
    from evals.tasks.t2i import T2ITask, generate_codes
    from evals.tasks.vqa import VQATask

    tmp, ho, oracle = env
    tok, _, _ = fx.tokenizers(tmp)
    ctx = fx.context(tmp, oracle, ho, batch_size=1, image_blind=False)
    r = VQATask().run(ctx)
    bl = ctx.cfg.diffusion.sample_block_length
    tokens = [len(tok.encode(it.reference)) + 1 for it in ho.vqa]  # each answer and its EOS
    # the oracle is confident: one denoising forward per block an answer spans (the prefill is not one)
    forwards = [-(-(len(it.prompt) + n) // bl) - len(it.prompt) // bl for it, n in zip(ho.vqa, tokens)]
    assert r.scores["items"] == len(ho.vqa) and r.scores["accuracy"] == 1.0
    assert r.scores["tokens_per_forward"] == pytest.approx(sum(tokens) / sum(forwards))
    ctx = fx.context(tmp, oracle, ho, decoders={"oracle": fx.oracle_decoder(ho)})
    steps = [generate_codes(ctx, it)[2] for it in ho.t2i]
    t = T2ITask().run(ctx)
    assert t.scores["tokens_per_forward"] == pytest.approx(sum(it.grid[0] * it.grid[1] for it in ho.t2i) / sum(steps))
    assert 0 < sum(steps) <= t.scores["nfe_per_image"] * len(ho.t2i)  # the prefill is not counted


def test_speed_counts_are_exact(env):
    from evals.tasks.speed import SpeedTask

    tmp, ho, oracle = env
    ctx = fx.context(tmp, oracle, ho, speed_repeats=1, speed_gen_length=64)
    d = ctx.cfg.diffusion
    r = SpeedTask().run(ctx)
    plen, bl = len(ho.vqa[0].prompt), d.sample_block_length
    blocks = -(-(plen + 64) // bl) - plen // bl  # the oracle is confident: one forward per block (+ prefill)
    assert r.scores["text/nfe"] == blocks + (1 if plen >= bl else 0)
    u = SpeedTask().run(fx.context(tmp, UniformModel(2304), ho, speed_repeats=1, speed_gen_length=64))
    # Never above the threshold: the fixed schedule, exactly `steps` forwards per block.
    assert u.scores["text/nfe"] == blocks * d.sample_steps + (1 if plen >= bl else 0)
    assert r.scores["image/tokens_per_forward"] > u.scores["image/tokens_per_forward"]


def test_missing_parts_are_reported_not_dropped(env):
    from evals.tasks.t2i import T2ITask

    tmp, ho, oracle = env
    ctx = fx.context(tmp, oracle, ho)
    ctx.unavailable["decoders"] = "no checkpoint in runs/x/decoder/checkpoints"
    r = T2ITask().run(ctx)
    assert r.status == "skipped" and "runs/x/decoder/checkpoints" in r.reason


def test_every_task_skips_without_its_parts_or_its_items(env):
    """The shared prologue (evals.context.HeldOutTask): a missing part or an empty item list is a skip naming why."""
    from evals.context import EvalContext, HeldOutTask
    from evals.heldout import HeldOut
    from evals.tasks import REGISTRY, get_task

    tmp, _, oracle = env
    for name in REGISTRY:
        task = get_task(name)
        assert isinstance(task, HeldOutTask), name
        empty = task.run(fx.context(tmp, oracle, HeldOut(), decoders={"d": lambda ids: ids}))
        assert empty.status == "skipped" and empty.reason.startswith("no "), (name, empty.reason)
        bare = task.run(EvalContext(cfg=fx.tiny_cfg()))
        assert bare.status == "skipped" and bare.reason.startswith("needs "), (name, bare.reason)
