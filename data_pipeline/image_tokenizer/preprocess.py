"""Image preprocessing as released: mean/std 0.5 normalisation, understanding resize (Qwen2.5-VL smart_resize to a
multiple of the factor within pixel bounds, cover-resize BICUBIC + centre crop), generation crop (var_center_crop on
the factor lattice with a patch budget and aspect <= 4). Sources: LLaDA2.0-Uni `decoder/smart_img_process.py`,
`decoder/utils.py`; sglang-omni `preprocessor.py`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA is composited over opaque white (official); other modes are converted (LA/P lose alpha unwhitened)."""
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    h = max(round(height / factor) * factor, factor)
    w = max(round(width / factor) * factor, factor)
    if h * w > max_pixels:
        s = math.sqrt(max_pixels / (height * width))
        h = max(math.floor(height * s / factor) * factor, factor)
        w = max(math.floor(width * s / factor) * factor, factor)
    elif h * w < min_pixels:
        s = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * s / factor) * factor
        w = math.ceil(width * s / factor) * factor
    return h, w


def resize_for_understanding(img: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    img = to_rgb(img)
    W, H = img.size
    th, tw = smart_resize(H, W, factor, min_pixels, max_pixels)
    if (th, tw) == (H, W):
        return img
    scale = max(th / H, tw / W)
    rh, rw = int(round(H * scale)), int(round(W * scale))
    img = img.resize((rw, rh), resample=Image.BICUBIC)
    ch, cw = max((rh // factor) * factor, th), max((rw // factor) * factor, tw)
    top, left = (rh - ch) // 2, (rw - cw) // 2
    return img.crop((left, top, left + cw, top + ch))


def generate_crop_size_list(num_patches: int, factor: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(w, h) multiples of factor with (w/f)(h/f) <= num_patches and aspect <= max_ratio, staircase walk."""
    out, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * factor, hp * factor))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def var_center_crop(img: Image.Image, sizes: list[tuple[int, int]], scale: bool = False) -> Image.Image:
    """Pick the size whose aspect best matches the image (ties -> larger (w, h)), then centre-crop it.

    scale=False is the official behaviour: crop pixels without scaling, padding black where the image is smaller.
    scale=True first resizes (LANCZOS) to cover the chosen size, so the crop shows the whole image content —
    used for generation targets of small toy images and photos much larger than the budget.
    """
    img = to_rgb(img)
    W, H = img.size
    rem = [(min(cw / W, ch / H) / max(cw / W, ch / H), (cw, ch)) for cw, ch in sizes]
    cw, ch = max(rem)[1]
    if scale:
        s = max(cw / W, ch / H)
        img = img.resize((max(cw, round(W * s)), max(ch, round(H * s))), Image.LANCZOS)
        W, H = img.size
    left, top = max(0, (W - cw) // 2), max(0, (H - ch) // 2)
    return img.crop((left, top, left + cw, top + ch))  # PIL pads with black outside the image


def to_pixel_values(img: Image.Image, mean=0.5, std=0.5) -> torch.Tensor:
    """uint8 HxWx3 -> float32 [3, H, W], x/255 then (x - mean)/std per channel (mean/std: a number or one per
    channel; released: 0.5 / 0.5 -> [-1, 1]). The defaults give the [-1, 1] pixels decoders work in; a tokenizer's
    input goes through `prepare.pixel_values`, which passes the tokenizer's own mean/std."""
    return normalise(np.asarray(to_rgb(img))[None], mean, std)[0]


def normalise(batch: np.ndarray, mean=0.5, std=0.5, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] (RGB images of one size) -> float32 [B, 3, H, W] contiguous (into `out` if given, e.g.
    a shared-memory slot), `to_pixel_values` of each image bit for bit, in four whole-batch passes (per image it
    cost ~200 us on this CPU, half a tokenizer forward)."""
    src = torch.from_numpy(np.require(batch, np.uint8, ["C", "W"])).permute(0, 3, 1, 2)
    x = torch.empty(src.shape) if out is None else out
    x.copy_(src)
    return x.div_(255.0).sub_(_per_channel(mean)).div_(_per_channel(std))


def from_pixel_values(px: torch.Tensor) -> Image.Image:
    """Inverse of `to_pixel_values` at its defaults: [3, H, W] in [-1, 1] (clamped) -> RGB image."""
    a = ((px.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


def _per_channel(v) -> torch.Tensor | float:
    if isinstance(v, (int, float)):
        return float(v)
    t = torch.tensor([float(x) for x in v], dtype=torch.float32)
    if t.numel() != 3:
        raise ValueError(f"image mean/std {list(v)} must have 3 entries (one per RGB channel)")
    return t.view(3, 1, 1)
