"""`unidiff generate`: understanding (image + question -> text), text-to-image (-> VQ token grid) and editing,
from a checkpoint, with the official prompt layout and the sampler settings of `diffusion.sample_*` / `cfg_*`.

The token-level functions (`understand`, `text_to_image`, `edit`) take a loaded model and tokenizers, so evals and
notebooks call them directly; `cmd_generate` only loads files and writes results.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import layout
from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.preprocess import (generate_crop_size_list, resize_for_understanding,
                                                      to_pixel_values, var_center_crop)
from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path
from training import accelerator
from training.checkpoint import CheckpointManager
from training.config_errors import ConfigError
from training.diffusion.samplers import edit_image, generate_image, generate_text
from training.engines.shard_format import full_state_dict_from_checkpoint
from training.hf_format import import_hf
from training.model import build_model

SYSTEM_EDIT = "You are an image editing assistant."


def _image_header(specials, gh: int, gw: int) -> list[int]:
    return [specials.image_start, specials.grid(gh), specials.grid(gw), specials.boi]


def understand(model, tok, specials, offset: int, images: list[tuple], question: str, dcfg,
               generator: torch.Generator | None = None) -> tuple[str, dict]:
    """images: [(vq grid [gh, gw] array, gh, gw)]; returns (answer text, stats)."""
    prompt = layout.chat_prompt(tok, specials, offset, layout.SYSTEM_UNDERSTAND, question, images)
    res = generate_text(model, [prompt], mask_id=specials.mask, eos_id=specials.eos, gen_length=dcfg.sample_gen_length,
                        block_length=dcfg.sample_block_length, steps=dcfg.sample_steps,
                        threshold=dcfg.sample_threshold, strategy=dcfg.sample_strategy,
                        temperature=dcfg.sample_temperature, generator=generator, device=_device(model))
    n = int(res.lengths[0])
    return tok.decode(res.tokens[0, :n].tolist()), {"nfe": res.nfe, "tokens": n}


def text_to_image(model, tok, specials, offset: int, codebook_size: int, caption: str, grid: tuple[int, int],
                  dcfg, samples: int = 1, generator: torch.Generator | None = None):
    """-> ImageResult (codes [samples, gh, gw]); CFG against the `<uncondition>` prompt at dcfg.cfg_scale."""
    header = _image_header(specials, *grid)
    cond = layout.chat_prompt(tok, specials, offset, layout.SYSTEM_T2I, caption) + header
    uncond = layout.chat_prompt(tok, specials, offset, layout.SYSTEM_T2I, caption, uncondition=True) + header
    return generate_image(model, cond, uncond, grid, mask_id=specials.mask, image_offset=offset,
                          codebook_size=codebook_size, cfg_scale=dcfg.cfg_scale, cfg_rescale=dcfg.cfg_rescale,
                          samples=samples, steps=dcfg.sample_image_steps, block_length=dcfg.sample_block_length,
                          threshold=dcfg.sample_threshold, strategy=dcfg.sample_strategy,
                          temperature=dcfg.sample_temperature, generator=generator, device=_device(model))


def edit(model, tok, specials, offset: int, codebook_size: int, source: tuple, instruction: str, dcfg,
         samples: int = 1, generator: torch.Generator | None = None):
    """source: (vq grid, gh, gw); the output grid equals the source grid. Branches: conditional, instruction
    replaced by `<uncondition>`, source image dropped."""
    _, gh, gw = source
    header = _image_header(specials, gh, gw)
    cond = layout.chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction, [source]) + header
    no_text = layout.chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction, [source], uncondition=True) + header
    no_image = layout.chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction) + header
    return edit_image(model, cond, no_text, no_image, (gh, gw), mask_id=specials.mask, image_offset=offset,
                      codebook_size=codebook_size, text_scale=dcfg.cfg_text_scale, image_scale=dcfg.cfg_image_scale,
                      samples=samples, steps=dcfg.sample_image_steps, block_length=dcfg.sample_block_length,
                      threshold=dcfg.sample_threshold, strategy=dcfg.sample_strategy,
                      temperature=dcfg.sample_temperature, generator=generator, device=_device(model))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def load_model(cfg, checkpoint: str | None, device: str = "cpu"):
    """An HF-format dir (config.json + safetensors) or a framework checkpoint dir of any engine/layout; default:
    the latest valid checkpoint of the run dir."""
    if checkpoint and (Path(checkpoint) / "config.json").exists():
        return import_hf(checkpoint, device=device, base=cfg.model)[1].eval()
    if not checkpoint:
        found = CheckpointManager(cfg.run_dir).latest_valid()  # it appends checkpoints/ itself
        if found is None:
            raise ConfigError(f"no valid checkpoint under {cfg.run_dir / 'checkpoints'}; pass --checkpoint DIR "
                              f"(a checkpoint step dir or an HF-format dir)")
        checkpoint = str(found)
    model = build_model(cfg.model, device)
    state = full_state_dict_from_checkpoint(Path(checkpoint))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("optim.")}, strict=True)
    return model.eval()


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        gh, gw = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid {text!r} is not of the form HxW in image tokens, e.g. 8x8") from None
    return gh, gw


def _encode_image(image_tok, icfg, path: str, for_generation: bool) -> tuple:
    from PIL import Image

    img = Image.open(path)
    if for_generation:  # an editing source uses the generation crop, so the output grid is a generation grid
        img = var_center_crop(img, generate_crop_size_list(icfg.gen_max_patches, icfg.resize_factor), scale=True)
    else:
        img = resize_for_understanding(img, icfg.resize_factor, icfg.min_pixels, icfg.max_pixels)
    codes = image_tok.encode_images([to_pixel_values(img, image_tok.mean[0], image_tok.std[0])])[0]
    return codes.numpy(), int(codes.shape[0]), int(codes.shape[1])


def cmd_generate(cfg, args) -> int:
    """args: task (understand | t2i | edit), prompt, image, grid, checkpoint, out, samples, seed, device."""
    if args.task in ("understand", "edit") and not args.image:
        raise ConfigError(f"generate {args.task} needs --image PATH")
    device = args.device or str(accelerator.device_for(0))
    t0 = time.time()
    tok = load_text_tokenizer(text_tokenizer_path(cfg.data))
    specials = layout.SpecialTokens.from_tokenizer(tok)
    model = load_model(cfg, args.checkpoint, device)
    offset, codebook = model.config.image_token_offset, model.config.vocab_size - model.config.image_token_offset
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out_dir = Path(args.out or cfg.run_dir / "generate")
    out_dir.mkdir(parents=True, exist_ok=True)
    dcfg = cfg.diffusion
    if args.task == "understand":
        image_tok = load_image_tokenizer(cfg.data.image_tokenizer.path, device)
        src = _encode_image(image_tok, cfg.data.image_tokenizer, args.image, for_generation=False)
        answer, stats = understand(model, tok, specials, offset, [src], args.prompt, dcfg, gen)
        (out_dir / "answer.json").write_text(json.dumps({"question": args.prompt, "answer": answer, **stats}))
        print(answer)
        summary = f"{stats['tokens']} tokens in {stats['nfe']} forwards"
    else:
        if args.task == "t2i":
            grid = _parse_grid(args.grid)
            res = text_to_image(model, tok, specials, offset, codebook, args.prompt, grid, dcfg, args.samples, gen)
        elif args.task == "edit":
            image_tok = load_image_tokenizer(cfg.data.image_tokenizer.path, device)
            src = _encode_image(image_tok, cfg.data.image_tokenizer, args.image, for_generation=True)
            res = edit(model, tok, specials, offset, codebook, src, args.prompt, dcfg, args.samples, gen)
        else:
            raise ConfigError(f"generate task={args.task} is not known: understand | t2i | edit")
        codes = res.codes.cpu().numpy().astype(np.int32)
        np.save(out_dir / "codes.npy", codes)
        (out_dir / "codes.json").write_text(json.dumps({"task": args.task, "prompt": args.prompt,
                                                        "grid": list(codes.shape[1:]), "codes": codes.tolist(),
                                                        "nfe": res.nfe}))
        summary = f"{codes.shape[0]} x {codes.shape[1]}x{codes.shape[2]} token grids in {res.nfe} forwards"
    print(f"generate {args.task}: {summary}, {time.time() - t0:.1f}s -> {out_dir}")
    return 0


def add_generate_args(p) -> None:
    """The CLI flags of `unidiff generate CONFIG [overrides]` (sampler knobs are config keys: diffusion.sample_*)."""
    p.add_argument("--task", choices=["understand", "t2i", "edit"], required=True)
    p.add_argument("--prompt", required=True, help="question (understand), caption (t2i) or instruction (edit)")
    p.add_argument("--image", default="", help="input image path (understand, edit)")
    p.add_argument("--grid", default="8x8", help="t2i output grid HxW in image tokens")
    p.add_argument("--checkpoint", default="", help="checkpoint step dir or HF-format dir (default: latest in run)")
    p.add_argument("--out", default="", help="output dir (default: <run dir>/generate)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
