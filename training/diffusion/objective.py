"""The masked / block diffusion loss: the one objective every engine and every stage calls.

Per batch (the loader's dict: input_ids, doc_ids, maskable, is_image, position_ids, all [B, L]; CFG condition
dropout is already in the data, see data.t2i_uncond_prob):
  1. t per sample (or per block), mask every maskable token with probability mask_prob(t); optionally the
     complementary mask as a second copy of the batch; a batch of sampler trajectories (`reveal`, path
     distillation) is masked at a cut of each block's trajectory instead (noise.trajectory_mask);
  2. forward x_t || x_0 under the block-diffusion mask (MDLM: x_t only under the document mask);
  3. cross-entropy on masked positions, optional ELBO weight, normalised per masked token or per maskable token
     ("sequence": the NELBO per token, LLaDA's 1/(B L) for pre-training and 1/answer-length for SFT; "token" over
     the global batch when the trainer passes the step's count);
     per-modality weights; CAP entropy term; the model's router aux loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.diffusion.masks import training_inputs
from training.diffusion.noise import (apply_mask, complementary_mask, draw_mask, elbo_weight, mask_prob, per_token_t,
                                      sample_t, time_from_mask_prob, trajectory_mask)
from training.diffusion.schedule import block_size_at, whole_sequence


def token_id(specials, name: str) -> int:
    """A special token id from a SpecialTokens-like object (attribute) or a mapping."""
    value = specials[name] if isinstance(specials, dict) else getattr(specials, name, None)
    if value is None:
        raise KeyError(f"special token '{name}' is missing from {type(specials).__name__}")
    return int(value)


def _noise(batch: dict, cfg, block_size: int, mask_id: int, generator):
    """-> (x_t, masked [B', L], t per token [B', L], batch') with B' = 2B under complementary masking."""
    ids, maskable = batch["input_ids"], batch["maskable"].bool()
    if "reveal" in batch:  # a sampler trajectory carries its own masks (path distillation)
        masked, t = trajectory_mask(batch["reveal"], block_size, generator)
        return apply_mask(ids, masked, mask_id), masked, t.clamp(min=cfg.mask_eps), batch
    bsz, length = ids.shape
    shape = (bsz, -(-length // block_size)) if cfg.t_per_block and not whole_sequence(block_size, length) else (bsz,)
    t = per_token_t(sample_t(shape, cfg.mask_low, cfg.mask_high, cfg.mask_eps, cfg.stratified_t, ids.device,
                             generator), length, block_size)
    p = mask_prob(cfg.schedule, t)
    masked = draw_mask(maskable, p, generator)
    if cfg.complementary:
        # The inverse mask is an exact draw at mask probability 1 - p, i.e. at the time with that mask probability.
        t_inv = time_from_mask_prob(cfg.schedule, 1.0 - p).clamp(min=cfg.mask_eps)
        masked = torch.cat([masked, complementary_mask(masked, maskable)])
        t = torch.cat([t, t_inv])
        batch = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == bsz else v
                 for k, v in batch.items()}
    return apply_mask(batch["input_ids"], masked, mask_id), masked, t, batch


def _head_ce(weight, hidden: torch.Tensor, target: torch.Tensor, with_entropy: bool):
    logits = F.linear(hidden, weight).float()  # the LM head (bias-free, full vocab); a plain op, not a module call
    ce = F.cross_entropy(logits, target, reduction="none")
    correct = logits.argmax(-1) == target
    if not with_entropy:
        return ce, correct, ce.new_zeros(0)
    logp = F.log_softmax(logits, dim=-1)
    return ce, correct, -(logp.exp() * logp).sum(-1)


def masked_head_ce(head, hidden: torch.Tensor, target: torch.Tensor, chunk: int, with_entropy: bool = False):
    """Cross-entropy of the LM head at the selected rows hidden [N, H] -> (ce [N], argmax == target [N], predictive
    entropy [N] if asked), `chunk` rows at a time. Each chunk's fp32 logits are freed after its forward and
    recomputed in the backward (activation checkpointing), so the head's peak is chunk x V, not N x V.
    A head split by vocab rows under tensor parallelism (engines/vocab_parallel.py) brings its own per-chunk
    function with the same results (chunk x V/tp logits per rank, statistics combined over the TP group)."""
    w, head_ce = head.weight, getattr(head, "chunk_ce", _head_ce)
    pieces = [head_ce(w, hidden, target, with_entropy)] if hidden.shape[0] <= chunk or not torch.is_grad_enabled() \
        else [checkpoint(head_ce, w, h, tt, with_entropy, use_reentrant=False)
              for h, tt in zip(hidden.split(chunk), target.split(chunk))]
    ce, correct, entropy = (torch.cat(parts) for parts in zip(*pieces))
    return ce, correct, entropy


def corrupt(batch: dict, cfg, step: int, specials, generator: torch.Generator | None = None) -> dict:
    """Step 1 (all the objective's randomness): the batch with x_t, masked, t, block_size and the tokens the loss
    is normalised by (`counted`: masked ones for "token", maskable ones for "sequence"). Separate from the forward
    so the trainer can count a whole step's masked tokens over data parallel before the first backward."""
    mask_id = token_id(specials, "mask")
    length = batch["input_ids"].shape[1]
    block_size = block_size_at(cfg.block_schedule, step, length)
    x_t, masked, t, batch = _noise(batch, cfg, block_size, mask_id, generator)
    counted = masked if cfg.normalize == "token" else batch["maskable"].bool()
    return {**batch, "x_t": x_t, "masked": masked, "t": t, "counted": counted, "block_size": block_size}


def diffusion_loss(model, batch: dict, cfg, step: int, specials, generator: torch.Generator | None = None,
                   denom: torch.Tensor | None = None):
    """One training forward. cfg: DiffusionConfig; specials: SpecialTokens-like (needs `mask`); batch: the loader's, or `corrupt()`'s output. denom: what the weighted CE sum is
    divided by (default: this batch's `counted` tokens; the trainer passes the step's global count per micro-batch,
    so a data-parallel step equals one process over the whole global batch). Returns (loss scalar tensor with grad,
    metrics dict of detached tensors / ints).

    metrics: loss, loss_diffusion, loss_text, loss_image, cap_entropy, aux_loss, masked_frac, acc_masked,
    n_masked, block_size, and router: the model's per-MoE-layer RouterStats (expert loads, entropy)."""
    if "x_t" not in batch:
        batch = corrupt(batch, cfg, step, specials, generator)
    x_t, masked, t, block_size, counted = (batch[k] for k in ("x_t", "masked", "t", "block_size", "counted"))
    metrics = {}
    mask_id = token_id(specials, "mask")
    length = x_t.shape[1]
    x0, doc, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    is_image, maskable = batch["is_image"].bool(), batch["maskable"].bool()

    core = getattr(model, "module", model)  # an engine wrapper (DeepSpeed, DDP) holds the LLaDA2MoE in .module
    attention = getattr(getattr(core, "config", None), "attention", "auto")
    ids, positions, attn_mask = training_inputs(x_t, x0, pos, doc, block_size, attention)
    embeds = None
    if cfg.mask_embed_noise_std > 0 and step < cfg.mask_embed_noise_steps:
        # LLaDA2.0: an AR-initialised mask embedding decays to ~0 and gradients explode; noise keeps it informative.
        embeds = core.embed(ids)
        noisy = ids == mask_id
        embeds = embeds + cfg.mask_embed_noise_std * torch.randn(embeds.shape, device=embeds.device,
                                                                  generator=generator).to(embeds.dtype) * noisy[..., None]
    out = model(input_ids=None if embeds is not None else ids, position_ids=positions, attention_mask=attn_mask,
                inputs_embeds=embeds, logits_to_keep=length, return_hidden=True)  # x_0 never needs the LM head

    # The LM head runs on the masked rows only, a chunk at a time (masked_head_ce): never [B, L, V] logits.
    sel = masked.nonzero(as_tuple=True)  # one host sync (the count of masked tokens) for every selection below
    target = x0[sel]
    ce, correct, entropy = masked_head_ce(core.lm_head, out.hidden[sel], target, cfg.loss_chunk,
                                          with_entropy=cfg.cap_lambda > 0)
    w = elbo_weight(cfg.schedule, t[sel]) if cfg.elbo_weight else torch.ones_like(ce)
    img = is_image[sel]
    lam = torch.where(img, cfg.loss_weight_image, cfg.loss_weight_text)
    denom = counted.sum().clamp(min=1) if denom is None else denom
    loss_diff = (lam * w * ce).sum() / denom
    text_denom = (counted & ~is_image).sum().clamp(min=1)
    image_denom = (counted & is_image).sum().clamp(min=1)
    loss_text = (w * ce * ~img).sum() / text_denom
    loss_image = (w * ce * img).sum() / image_denom

    loss = loss_diff + out.aux_loss
    cap = torch.zeros((), device=ce.device)
    if cfg.cap_lambda > 0:
        # CAP (LLaDA2.0) = dParallel's certainty forcing (dFactory confidence_beta): sharpen the distribution where
        # the prediction is already right, so threshold decoding accepts more (docs/finetune.md section 3).
        cap = (entropy * correct).sum() / correct.sum().clamp(min=1)
        loss = loss + cfg.cap_lambda * cap
    # No masked token: loss_diff is a sum over an empty selection, still in the graph (the head ran on zero rows:
    # zero grads reach every parameter, so every rank runs the same backward), with no host sync to test for it.

    n_masked = masked.sum()
    metrics.update(loss=loss.detach(), loss_diffusion=loss_diff.detach(), loss_text=loss_text.detach(),
                   loss_image=loss_image.detach(), cap_entropy=cap.detach(), aux_loss=out.aux_loss.detach(),
                   masked_frac=(n_masked / maskable.sum().clamp(min=1)).detach(),
                   acc_masked=(correct.sum() / n_masked.clamp(min=1)).detach(), n_masked=n_masked.detach(),
                   block_size=block_size, router=out.router)
    return loss, metrics
