"""Phase 2 of `unidiff tokenizer train`: the codebook learned on the frozen ViT's features.

The released VQ is cosine: unit quant_conv outputs matched to unit codebook rows. Training keeps that rule and adds
what VQ-VAE training needs (van den Oord et al. 2017): the codebook term ||sg(z) - e||^2, the commitment term
beta ||z - sg(e)||^2, and a reconstruction through the straight-through estimator z + sg(e - z) of the ViT features
by post_quant_conv (cosine; the module the released layout carries and encoding leaves unused), so the codes keep what the
features say. Codes no batch picked for `dead_code_after` steps are re-seeded from that step's features (the
restarts of Dhariwal et al. 2020 / Zeghidour et al. 2021), identically on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import accelerator


class PixelHead(torch.nn.Module):
    """Training-only: each quantized code -> its patch's pixels [3*p*p], so the codes keep the local pattern the
    decoder must redraw (measured: SigLIP features alone, k-means'd, lose shape detail a random ViT keeps)."""

    def __init__(self, embed_dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = torch.nn.Linear(embed_dim, 3 * patch * patch)

    def loss(self, st: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        target = F.unfold(pixels, self.patch, stride=self.patch).transpose(1, 2).flatten(0, 1)  # raster order
        return F.mse_loss(self.proj(st), target)


def vq_loss(vqmodel, feats: torch.Tensor, beta: float, pixel_head: PixelHead | None = None,
            pixels: torch.Tensor | None = None, pixel_weight: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen ViT features [B, N, latent] (of `pixels` [B, 3, H, W]) -> (loss, ids [B*N], unit features [B*N, D])."""
    w = vqmodel.quant_conv.weight.view(vqmodel.quant_conv.out_channels, -1)
    z = F.normalize(F.linear(feats, w, vqmodel.quant_conv.bias), dim=-1).flatten(0, 1)
    e = F.normalize(vqmodel.quantize.embedding.weight, dim=-1)
    ids = (z.detach() @ e.detach().t()).argmax(-1)  # the encoder's own rule (vq.VQModel.codes)
    q = e[ids]
    codebook = F.mse_loss(q, z.detach())
    commit = F.mse_loss(z, q.detach())
    st = z + (q - z).detach()
    post = vqmodel.post_quant_conv.weight.view(vqmodel.post_quant_conv.out_channels, -1)
    # cosine, not MSE: a per-token loss whose mean over a rank's tokens averages to the global batch's exactly
    rec = (1 - F.cosine_similarity(F.linear(st, post, vqmodel.post_quant_conv.bias), feats.flatten(0, 1), dim=-1)).mean()
    loss = rec + codebook + beta * commit
    if pixel_weight:
        loss = loss + pixel_weight * pixel_head.loss(st, pixels)
    return loss, ids, z.detach()


@torch.no_grad()
def restart_dead_codes(vqmodel, last_used: torch.Tensor, ids: torch.Tensor, z: torch.Tensor, step: int,
                       after: int, seed: int) -> int:
    """Mark the codes this step's global batch used; codes unused for `after` steps take a random feature vector
    of the global batch. Every rank gathers the same batch and draws with the same seed, so the codebooks stay
    equal. Returns how many codes were re-seeded."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = accelerator.comm_device()
        zs = [torch.empty_like(z, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(zs, z.to(dev))
        idss = [torch.empty_like(ids, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(idss, ids.to(dev))
        z, ids = torch.cat(zs).to(z.device), torch.cat(idss).to(ids.device)
    last_used[ids.unique().to(last_used.device)] = step
    dead = (step - last_used >= after).nonzero().flatten()
    if dead.numel():
        g = torch.Generator().manual_seed(seed * 7919 + step)
        pick = torch.randint(len(z), (dead.numel(),), generator=g)
        emb = vqmodel.quantize.embedding.weight
        emb[dead.to(emb.device)] = z[pick.to(z.device)].to(emb.dtype)
        last_used[dead] = step
    return int(dead.numel())
