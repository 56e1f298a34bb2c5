"""Understanding (image + question -> text), text-to-image (-> VQ token grid) and editing on a loaded backbone,
with the official prompt layout (`data_pipeline.layout`) and one `SamplerSettings`.

The token-level functions (`understand`, `text_to_image`, `edit`) take a loaded model and tokenizers, so evals and
notebooks call them directly; `generate_files` is the typed entry of `unidiff generate`: it loads the files, runs
one task and writes the results.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import layout
from training.config_errors import ConfigError
from training.diffusion.samplers import SamplerSettings, edit_image, generate_image, generate_text

TASKS = ("understand", "t2i", "edit")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def understand(model, tok, specials, offset: int, images: list[tuple], question: str, settings: SamplerSettings,
               generator: torch.Generator | None = None) -> tuple[str, dict]:
    """images: [(vq grid [gh, gw] array, gh, gw)]; returns (answer text, stats)."""
    prompt = layout.chat_prompt(tok, specials, offset, layout.SYSTEM_UNDERSTAND, question, images)
    res = generate_text(model, [prompt], settings, mask_id=specials.mask, eos_id=specials.eos, generator=generator,
                        device=_device(model))
    n = int(res.lengths[0])
    return tok.decode(res.tokens[0, :n].tolist()), {"nfe": res.nfe, "tokens": n}


def text_to_image(model, tok, specials, offset: int, codebook_size: int, caption: str, grid: tuple[int, int],
                  settings: SamplerSettings, samples: int = 1, generator: torch.Generator | None = None):
    """-> ImageResult (codes [samples, gh, gw]); CFG against the `<uncondition>` prompt at settings.cfg_scale."""
    cond = layout.t2i_prompt(tok, specials, offset, caption, *grid)
    uncond = layout.t2i_prompt(tok, specials, offset, caption, *grid, uncondition=True)
    return generate_image(model, cond, uncond, grid, settings, mask_id=specials.mask, image_offset=offset,
                          codebook_size=codebook_size, samples=samples, generator=generator, device=_device(model))


def edit(model, tok, specials, offset: int, codebook_size: int, source: tuple, instruction: str,
         settings: SamplerSettings, samples: int = 1, generator: torch.Generator | None = None):
    """source: (vq grid, gh, gw); the output grid equals the source grid (three guidance branches, layout.edit_prompts)."""
    _, gh, gw = source
    cond, no_text, no_image = layout.edit_prompts(tok, specials, offset, instruction, source)
    return edit_image(model, cond, no_text, no_image, (gh, gw), settings, mask_id=specials.mask, image_offset=offset,
                      codebook_size=codebook_size, samples=samples, generator=generator, device=_device(model))


def encode_image(image_tok, icfg, path: str, mode: str) -> tuple:
    """An image file -> (vq grid [gh, gw] array, gh, gw) by the shared recipe (mode understand | generate: an
    editing source takes the generation crop, so the output grid is a generation grid)."""
    from PIL import Image

    from data_pipeline.image_tokenizer.prepare import tokenize_image

    _, codes = tokenize_image(Image.open(path), image_tok, icfg, mode)
    return codes.numpy(), int(codes.shape[0]), int(codes.shape[1])


def parse_grid(text: str) -> tuple[int, int]:
    try:
        gh, gw = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--grid {text!r} is not of the form HxW in image tokens, e.g. 8x8") from None
    return gh, gw


def generate_files(cfg, task: str, prompt: str, *, image: str = "", grid: tuple[int, int] = (8, 8),
                   checkpoint: str = "", out: str | Path | None = None, samples: int = 1, seed: int = 0,
                   device: str = "", decoder: str = "") -> str:
    """Run one task from the files the config names and write its results under `out` (default
    <run_dir>/generate): answer.json, or codes.npy + codes.json (+ image_<i>.png when a decoder checkpoint dir is
    given). Returns the one-line summary."""
    from data_pipeline.image_tokenizer.load import load_image_tokenizer
    from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path
    from training import accelerator
    from training.inference.backbone import load_backbone

    if task not in TASKS:
        raise ConfigError(f"generate task={task} is not known: {' | '.join(TASKS)}")
    if task in ("understand", "edit") and not image:
        raise ConfigError(f"generate {task} needs --image PATH")
    device = device or str(accelerator.device_for(0))
    t0 = time.time()
    tok = load_text_tokenizer(text_tokenizer_path(cfg.data))
    specials = layout.SpecialTokens.from_tokenizer(tok)
    model, _ = load_backbone(cfg, checkpoint, device)
    offset, codebook = model.config.image_token_offset, model.config.vocab_size - model.config.image_token_offset
    gen = torch.Generator(device=device).manual_seed(seed)
    out_dir = Path(out or Path(cfg.run_dir) / "generate")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = SamplerSettings.from_config(cfg.diffusion)
    if task != "t2i":
        image_tok = load_image_tokenizer(cfg.data.image_tokenizer.path, device)
        src = encode_image(image_tok, cfg.data.image_tokenizer, image, "understand" if task == "understand"
                           else "generate")
    if task == "understand":
        answer, stats = understand(model, tok, specials, offset, [src], prompt, settings, gen)
        (out_dir / "answer.json").write_text(json.dumps({"question": prompt, "answer": answer, **stats}))
        print(answer)
        return f"generate {task}: {stats['tokens']} tokens in {stats['nfe']} forwards, {time.time() - t0:.1f}s -> " \
               f"{out_dir}"
    if task == "t2i":
        res = text_to_image(model, tok, specials, offset, codebook, prompt, grid, settings, samples, gen)
    else:
        res = edit(model, tok, specials, offset, codebook, src, prompt, settings, samples, gen)
    codes = res.codes.cpu().numpy().astype(np.int32)
    np.save(out_dir / "codes.npy", codes)
    (out_dir / "codes.json").write_text(json.dumps({"task": task, "prompt": prompt, "grid": list(codes.shape[1:]),
                                                    "codes": codes.tolist(), "nfe": res.nfe}))
    pictures = ""
    if decoder:
        from data_pipeline.image_tokenizer.preprocess import from_pixel_values
        from training.inference.decoders import decoder_fn

        for i, img in enumerate(decoder_fn(decoder)(res.codes.cpu())):
            from_pixel_values(img).save(out_dir / f"image_{i}.png")
        pictures = f" decoded to {codes.shape[0]} PNG,"
    return f"generate {task}: {codes.shape[0]} x {codes.shape[1]}x{codes.shape[2]} token grids in {res.nfe} " \
           f"forwards,{pictures} {time.time() - t0:.1f}s -> {out_dir}"
