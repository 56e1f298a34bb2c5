"""Samplers: an oracle model makes every sampler reproduce its target; the KV-cached decoder equals a recompute
reference on a real model; threshold acceptance needs fewer forwards; CFG scale 1 equals the conditional path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from training.config import load_config
from training.diffusion.masks import block_causal_mask
from training.diffusion.samplers import SamplerSettings, decode_blocks, edit_image, generate_image, generate_text
from training.diffusion.samplers.common import accept, propose, scheduled_count
from training.model import ModelOutput, build_model

pytestmark = pytest.mark.unit
MASK, EOS, UNCOND, COND, V, OFFSET = 1, 2, 3, 4, 64, 40  # image ids are [40, 64)
S = SamplerSettings.from_config  # the config's defaults, with the fields a test sets


def test_sampler_settings_read_every_config_key_once():
    from training.diffusion.config import DiffusionConfig
    from training.diffusion.samplers.settings import CONFIG_KEYS

    d = DiffusionConfig()
    for i, key in enumerate(CONFIG_KEYS.values()):  # a distinct value per key: a swapped mapping shows
        setattr(d, key, "low_confidence" if key == "sample_strategy" else 100 + i)
    got = SamplerSettings.from_config(d)
    assert {f: getattr(got, f) for f in CONFIG_KEYS} == {f: getattr(d, k) for f, k in CONFIG_KEYS.items()}
    assert len(set(CONFIG_KEYS.values())) == len(CONFIG_KEYS)
    assert S(d, steps=3).steps == 3 and S(d, steps=3).image_steps == got.image_steps
    with pytest.raises(TypeError, match="sample_steps"):
        S(d, sample_steps=3)  # the config's spelling is not a field


class Oracle(nn.Module):
    """Predicts target[position] with logit `strength` whenever the condition token is visible through the mask
    (or always if cond is None). Its cached 'keys' are the token ids themselves, so it checks what the sampler shows
    it: a visible cached key must never be a mask token (the cache holds the clean stream)."""

    def __init__(self, target, strength=30.0, cond=None, distractor=None):
        super().__init__()
        self.target, self.strength, self.cond, self.distractor = target, strength, cond, distractor
        self.calls = 0

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_kv=None, use_cache=False,
                inputs_embeds=None):
        self.calls += 1
        b, lq = input_ids.shape
        new = input_ids[:, None, :, None].float()
        keys = new if not past_kv else torch.cat([past_kv[0][0], new], 2)
        kid = keys[:, 0, :, 0].long()  # [B, Lk]
        mask = attention_mask if attention_mask is not None else torch.ones(b, 1, lq, kid.shape[1], dtype=torch.bool)
        lp = kid.shape[1] - lq
        assert not (mask[:, 0, :, :lp] & (kid[:, None, :lp] == MASK)).any(), "a cached visible key is a mask"
        sees = torch.ones(b, lq, dtype=torch.bool) if self.cond is None else \
            (mask[:, 0] & (kid == self.cond)[:, None, :]).any(-1)
        logits = torch.zeros(b, lq, V)
        logits.scatter_(-1, self.target[position_ids][..., None], (self.strength * sees.float())[..., None])
        if self.distractor is not None:
            logits[..., self.distractor] = 100.0
        return ModelOutput(logits=logits, aux_loss=torch.zeros(()), kv=[(new, new)] if use_cache else None)


@pytest.mark.parametrize("strategy", ["low_confidence", "top_k_margin", "neg_entropy"])
@pytest.mark.parametrize("strength", [30.0, 2.0])  # confident / unconfident (p ~ 0.11 < threshold) logits
def test_text_sampler_reproduces_oracle_target(strategy, strength):
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(5, V, (64,), generator=gen)
    prompts = [target[:11].tolist(), target[:6].tolist()]  # different lengths: left padding
    model = Oracle(target, strength)
    res = generate_text(model, prompts, S(gen_length=20, block_length=8, steps=4, threshold=0.95, strategy=strategy),
                        mask_id=MASK, eos_id=None)
    assert res.tokens[0].tolist() == target[11:31].tolist()
    assert res.tokens[1].tolist() == target[6:26].tolist()


def test_threshold_uses_fewer_forwards_than_fixed_schedule():
    target = torch.randint(5, V, (80,), generator=torch.Generator().manual_seed(1))
    prompt = [target[:16].tolist()]
    kw = dict(mask_id=MASK, eos_id=None)
    fixed = generate_text(Oracle(target), prompt, S(gen_length=64, block_length=16, steps=8, threshold=1.0), **kw)
    thresh = generate_text(Oracle(target), prompt, S(gen_length=64, block_length=16, steps=8, threshold=0.95), **kw)
    assert fixed.tokens.tolist() == thresh.tokens.tolist() == [target[16:].tolist()]
    assert fixed.nfe == 1 + 4 * 8  # prefill + 4 blocks x 8 steps
    assert thresh.nfe == 1 + 4  # one step per block on confident logits
    unsure = generate_text(Oracle(target, strength=2.0), prompt, S(gen_length=64, block_length=16, steps=8,
                                                                  threshold=0.95), **kw)
    assert unsure.nfe == fixed.nfe  # nothing clears the threshold: falls back to the schedule


def test_eos_early_stop():
    target = torch.randint(5, V, (200,), generator=torch.Generator().manual_seed(2))
    target[20 + 13:] = EOS  # answer of 13 tokens then EOS padding
    res = generate_text(Oracle(target), [target[:20].tolist()], S(gen_length=160, block_length=8, steps=4,
                                                                   threshold=0.95), mask_id=MASK, eos_id=EOS)
    assert res.lengths.tolist() == [13]
    assert res.tokens[0, :13].tolist() == target[20:33].tolist() and (res.tokens[0, 13:] == EOS).all()
    # prompt fills blocks 0-1 and half of 2; the EOS at index 33 lies in block 4: blocks 2, 3, 4 then stop.
    assert res.steps == 3


def _image_target(gh, gw, plen, seed=3):
    target = torch.randint(5, OFFSET, (plen + gh * gw + 8,), generator=torch.Generator().manual_seed(seed))
    target[plen:plen + gh * gw] = torch.randint(OFFSET, V, (gh * gw,), generator=torch.Generator().manual_seed(seed))
    return target


def test_text_to_image_cfg_with_oracle_and_image_only_logits():
    gh, gw = 3, 5
    cond = [10, 11, COND, 12, 13, 14, 15]  # caption holds the condition token, ends with the image header
    uncond = [10, UNCOND, 15]  # shorter: left-padded with masks that nobody attends
    target = _image_target(gh, gw, len(cond))
    # Left padding shifts nothing: the uncond row's positions count from 0 like an unpadded prompt, the canvas
    # starts at the same index, and the oracle keys on positions of the *conditional* row.
    oracle = Oracle(target, strength=8.0, cond=COND, distractor=7)  # a huge text logit must be ignored
    kw = dict(mask_id=MASK, image_offset=OFFSET, codebook_size=V - OFFSET)
    settings = S(image_steps=4, block_length=4, threshold=0.95, cfg_scale=3.0, cfg_rescale=0.7)
    res = generate_image(oracle, cond, uncond, (gh, gw), settings, **kw)
    assert res.ids[0].tolist() == target[7:7 + 15].tolist()
    assert res.codes.shape == (1, gh, gw) and torch.equal(res.codes[0].flatten() + OFFSET, res.ids[0])
    # The unconditional branch alone cannot know the target: CFG really used the conditional logits.
    alone = generate_image(oracle, uncond, None, (gh, gw), settings, **kw)
    assert alone.ids[0].tolist() != target[3:3 + 15].tolist()
    assert ((alone.ids >= OFFSET) & (alone.ids < V)).all()


def test_editing_three_way_guidance_with_oracle():
    gh, gw = 2, 4
    src = [40, 41, 42, 43, 44, 45, 46, 47]
    cond = [10, *src, COND, 15]
    no_text = [10, *src, UNCOND, 15]
    no_image = [10, COND, 15]
    target = _image_target(gh, gw, len(cond), seed=5)
    res = edit_image(Oracle(target, strength=6.0, cond=COND), cond, no_text, no_image, (gh, gw),
                     S(text_scale=4.0, image_scale=0.5, image_steps=4, block_length=4), mask_id=MASK,
                     image_offset=OFFSET, codebook_size=V - OFFSET, samples=2)
    assert res.ids.tolist() == [target[11:19].tolist()] * 2


@pytest.fixture(scope="module")
def tiny_model():
    # A wider init than the default 0.02, whose random model emits one token everywhere whatever the context.
    cfg = load_config("configs/model/tiny.yaml", ["model.attention=sdpa", "model.initializer_range=0.2"])
    return build_model(cfg.model, seed=0).eval()


def _recompute_reference(model, prompt, gen_length, block_length, steps, threshold):
    """No cache: every step reruns the whole sequence under the block-causal mask (dFactory's loop)."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    total, nfe = x.shape[1], 0
    for b in range(prompt.shape[1] // block_length, -(-total // block_length)):
        s, e = b * block_length, min((b + 1) * block_length, total)
        for step in range(steps):
            todo = x[:, s:e] == MASK
            if not todo.any():
                break
            mask = block_causal_mask(torch.arange(e), torch.ones(1, e, dtype=torch.bool), block_length)
            with torch.no_grad():
                logits = model(x[:, :e], attention_mask=mask).logits[:, s:e]
            nfe += 1
            tok, p, score = propose(logits)
            chosen = accept(todo, p, score, scheduled_count(todo, steps - step), threshold)
            x[:, s:e] = torch.where(chosen, tok, x[:, s:e])
    return x[:, prompt.shape[1]:], nfe


@pytest.mark.parametrize("threshold", [1.0, 0.02])
def test_cached_decoder_equals_recompute_reference(tiny_model, threshold):
    prompt = torch.randint(5, 2000, (1, 13), generator=torch.Generator().manual_seed(6))
    ref, ref_nfe = _recompute_reference(tiny_model, prompt.clone(), 19, 8, 4, threshold)
    res = decode_blocks(tiny_model, prompt, gen_length=19, block_length=8, steps=4, mask_id=MASK,
                        threshold=threshold)
    assert res.tokens.tolist() == ref.tolist()
    assert res.steps == ref_nfe and res.nfe == ref_nfe + 1  # + the prefill of the full prompt block


def test_cfg_scale_one_equals_conditional_path(tiny_model):
    cond = torch.randint(5, 2000, (21,), generator=torch.Generator().manual_seed(7)).tolist()
    uncond = cond[:4] + [UNCOND] + cond[-3:]
    kw = dict(mask_id=MASK, image_offset=2048, codebook_size=256)
    settings = S(image_steps=4, block_length=8, threshold=0.9, cfg_scale=1.0)
    guided = generate_image(tiny_model, cond, uncond, (4, 4), settings, **kw)
    plain = generate_image(tiny_model, cond, None, (4, 4), settings, **kw)
    assert guided.ids.tolist() == plain.ids.tolist()
    unconditional = generate_image(tiny_model, uncond, None, (4, 4), settings, **kw)
    assert unconditional.ids.tolist() != plain.ids.tolist()  # the branches differ, so the equality above means something
    assert ((plain.ids >= 2048) & (plain.ids < 2304)).all()
    other = generate_image(tiny_model, cond, uncond, (4, 4), settings.replace(cfg_scale=3.0), **kw)
    assert other.ids.tolist() != plain.ids.tolist()  # guidance does change the result at scale != 1
