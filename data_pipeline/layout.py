"""The official LLaDA2.0-Uni sequence layout: special tokens (resolved by name, never by id), image blocks,
chat roles, and builders for the sample kinds.

Image block (raster order, no row separators):
    <|image|> <|reserved_token_{gh}|> <|reserved_token_{gw}|> <boi>  vq_0+offset ... vq_{gh*gw-1}+offset  <|/image|>
Chat:
    <role>SYSTEM</role> {system} <role>HUMAN</role>{image blocks}{text}<role>ASSISTANT</role>{answer}
Text-to-image puts the image header in the prompt and the VQ ids in the answer, as the official generate_image does;
the unconditional (CFG) branch replaces the caption with <uncondition>.
(sglang-omni `models/llada2_uni/components/preprocessor.py`, LLaDA2.0-Uni ComfyUI port `generate_vq_tokens`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

MASK = "<|mask|>"
EOS = "<|endoftext|>"  # also the pad token of the release (156892)
IMAGE_START = "<|image|>"
IMAGE_END = "<|/image|>"
BOI = "<boi>"
UNCONDITION = "<uncondition>"
ROLE_START = "<role>"
ROLE_END = "</role>"
OFFICIAL_SPECIALS = (EOS, MASK, IMAGE_START, IMAGE_END, BOI, UNCONDITION, ROLE_START, ROLE_END)

SYSTEM_UNDERSTAND = "You are a multimodal understanding assistant."
SYSTEM_T2I = "You are a text-to-image generation assistant."
SYSTEM_EDIT = "You are an image editing assistant."
ROLE_SYSTEM, ROLE_HUMAN, ROLE_ASSISTANT = "SYSTEM", "HUMAN", "ASSISTANT"

TEXT, IMAGE = 0, 1  # modality flag values stored in token shards


def reserved_token(n: int) -> str:
    return f"<|reserved_token_{n}|>"


def _lookup(tok, s: str) -> int | None:
    for fn in ("token_to_id", "convert_tokens_to_ids"):
        if hasattr(tok, fn):
            i = getattr(tok, fn)(s)
            unk = getattr(tok, "unk_token_id", None)
            return None if i is None or (unk is not None and i == unk and s != getattr(tok, "unk_token", None)) \
                else int(i)
    raise TypeError(f"cannot resolve special tokens from {type(tok).__name__}: needs token_to_id or "
                    f"convert_tokens_to_ids")


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    eos: int
    image_start: int
    image_end: int
    boi: int
    uncondition: int
    role_start: int  # -1 if the tokenizer has no single <role> token (then roles are plain text pieces)
    role_end: int
    grid_ids: tuple[int, ...] = field(repr=False, default=())  # grid_ids[n] = id of <|reserved_token_{n}|>, -1 absent

    @property
    def pad(self) -> int:
        return self.eos

    def grid(self, n: int) -> int:
        if not 0 <= n < len(self.grid_ids) or self.grid_ids[n] < 0:
            raise ValueError(f"grid side {n} has no {reserved_token(n)} in this tokenizer "
                             f"(largest available: {self.max_grid})")
        return self.grid_ids[n]

    @property
    def max_grid(self) -> int:
        present = [n for n, i in enumerate(self.grid_ids) if i >= 0]
        return max(present) if present else -1

    def grid_side(self, token_id: int) -> int:
        """Inverse of grid(): the side n for a <|reserved_token_{n}|> id."""
        try:
            return self.grid_ids.index(int(token_id))
        except ValueError:
            raise ValueError(f"id {token_id} is not a <|reserved_token_n|> grid token") from None

    def to_dict(self) -> dict:
        """What pretokenize records in manifest.json (`specials`), so the loader never needs the tokenizer."""
        return {**{k: getattr(self, k) for k in ("mask", "eos", "image_start", "image_end", "boi", "uncondition",
                                                 "role_start", "role_end")}, "pad": self.pad,
                "grid_ids": list(self.grid_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "SpecialTokens":
        return cls(**{k: int(v) for k, v in d.items() if k not in ("grid_ids", "pad")},
                   grid_ids=tuple(int(i) for i in d.get("grid_ids", ())))

    @classmethod
    def from_tokenizer(cls, tok, max_grid: int = 4096) -> "SpecialTokens":
        """Resolve every token by its official string; a missing mandatory one is an error naming it."""
        ids = {}
        for name, s in (("mask", MASK), ("eos", EOS), ("image_start", IMAGE_START), ("image_end", IMAGE_END),
                        ("boi", BOI), ("uncondition", UNCONDITION)):
            i = _lookup(tok, s)
            if i is None:
                raise ValueError(f"text tokenizer has no special token {s!r} ({name}) of the official layout; "
                                 f"use the released tokenizer or one built by `build_sample_tokenizer`")
            ids[name] = i
        for name, s in (("role_start", ROLE_START), ("role_end", ROLE_END)):
            i = _lookup(tok, s)
            ids[name] = -1 if i is None else i
        grid = []
        for n in range(max_grid + 1):
            i = _lookup(tok, reserved_token(n))
            if i is None and n > 1 and (not grid or grid[-1] < 0):
                break  # two misses in a row past the start: the table has ended
            grid.append(-1 if i is None else i)
        while grid and grid[-1] < 0:
            grid.pop()
        return cls(grid_ids=tuple(grid), **ids)


@dataclass
class TokenSample:
    """One document in the official layout. `maskable`: positions the diffusion objective may mask (the answer;
    everything for pretraining documents). `modality`: TEXT / IMAGE per position (image iff id >= offset)."""

    ids: np.ndarray  # int32 [L]
    maskable: np.ndarray  # bool [L]
    modality: np.ndarray  # uint8 [L]
    task: str  # caption | vqa | t2i | interleaved
    prompt_len: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def image_header(specials: SpecialTokens, gh: int, gw: int) -> list[int]:
    """`<|image|><h><w><boi>`: what precedes the VQ ids (and ends a generation prompt)."""
    return [specials.image_start, specials.grid(gh), specials.grid(gw), specials.boi]


def image_block(grid_ids, gh: int, gw: int, specials: SpecialTokens, offset: int) -> list[int]:
    grid = np.asarray(grid_ids, dtype=np.int64).reshape(-1)
    if grid.size != gh * gw:
        raise ValueError(f"image block: {grid.size} VQ ids do not fill a {gh}x{gw} grid")
    return [*image_header(specials, gh, gw), *(grid + offset).tolist(), specials.image_end]


def _sample(prompt: list[int], answer: list[int], task: str, offset: int, meta: dict,
            all_maskable: bool = False) -> TokenSample:
    ids = np.asarray(prompt + answer, dtype=np.int32)
    maskable = np.zeros(len(ids), dtype=bool)
    maskable[0 if all_maskable else len(prompt):] = True
    modality = (ids >= offset).astype(np.uint8)
    return TokenSample(ids, maskable, modality, task, 0 if all_maskable else len(prompt), meta)


@lru_cache(maxsize=64)
def _fixed(tok, text: str) -> tuple[int, ...]:
    """A prompt piece that never changes (role headers, system prompts): tokenized once per tokenizer, which
    took two of the three tokenizer calls of every chat prompt (~40 us each) in pretokenize."""
    return tuple(tok.encode(text))


def chat_prompt(tok, specials: SpecialTokens, offset: int, system: str, text: str,
                images: list[tuple] = (), uncondition: bool = False) -> list[int]:
    """`<role>SYSTEM</role> {system} <role>HUMAN</role>{image blocks}{text}<role>ASSISTANT</role>`."""
    ids = list(_fixed(tok, f"{ROLE_START}{ROLE_SYSTEM}{ROLE_END} {system} {ROLE_START}{ROLE_HUMAN}{ROLE_END}"))
    for grid, gh, gw in images:
        ids += image_block(grid, gh, gw, specials, offset)
    ids += [specials.uncondition] if uncondition else tok.encode(text)
    ids += _fixed(tok, f"{ROLE_START}{ROLE_ASSISTANT}{ROLE_END}")
    return ids


def build_understanding(tok, specials: SpecialTokens, offset: int, images: list[tuple], question: str,
                        answer: str, task: str = "vqa", meta: dict | None = None,
                        system: str = SYSTEM_UNDERSTAND, extra_turns: list[tuple[str, str]] = ()) -> TokenSample:
    """Caption / VQA: prompt = images + question, answer = text + EOS (maskable). Further turns append
    `<role>HUMAN</role>{q}<role>ASSISTANT</role>` (not maskable) and `{a}` + EOS (maskable)."""
    prompt = chat_prompt(tok, specials, offset, system, question, images)
    s = _sample(prompt, tok.encode(answer) + [specials.eos], task, offset, meta or {})
    for q, a in extra_turns:
        head = tok.encode(f"{ROLE_START}{ROLE_HUMAN}{ROLE_END}{q}{ROLE_START}{ROLE_ASSISTANT}{ROLE_END}")
        ans = tok.encode(a) + [specials.eos]
        ids = np.asarray(head + ans, dtype=np.int32)
        s.ids = np.concatenate([s.ids, ids])
        s.maskable = np.concatenate([s.maskable, np.arange(len(ids)) >= len(head)])
        s.modality = np.concatenate([s.modality, (ids >= offset).astype(np.uint8)])
    return s


def t2i_prompt(tok, specials: SpecialTokens, offset: int, caption: str, gh: int, gw: int,
               uncondition: bool = False) -> list[int]:
    """Text-to-image prompt: caption (or `<uncondition>`, the CFG branch) + the image header of a gh x gw grid."""
    return chat_prompt(tok, specials, offset, SYSTEM_T2I, caption, uncondition=uncondition) + \
        image_header(specials, gh, gw)


def edit_prompts(tok, specials: SpecialTokens, offset: int, instruction: str, source: tuple) -> list[list[int]]:
    """Editing's three guidance branches, each ending with the header of the source's grid (the output grid):
    [conditional, instruction replaced by `<uncondition>`, source image dropped]. source: (grid, gh, gw)."""
    header = image_header(specials, source[1], source[2])
    return [chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction, [source]) + header,
            chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction, [source], uncondition=True) + header,
            chat_prompt(tok, specials, offset, SYSTEM_EDIT, instruction) + header]


def build_t2i(tok, specials: SpecialTokens, offset: int, caption: str, grid, gh: int, gw: int,
              uncondition: bool = False, meta: dict | None = None) -> TokenSample:
    """Text-to-image: prompt = `t2i_prompt`, answer = VQ ids + <|/image|> + EOS (maskable)."""
    prompt = t2i_prompt(tok, specials, offset, caption, gh, gw, uncondition)
    block = image_block(grid, gh, gw, specials, offset)
    return _sample(prompt, block[4:] + [specials.eos], "t2i", offset, meta or {})


def build_interleaved(tok, specials: SpecialTokens, offset: int, segments: list[tuple],
                      meta: dict | None = None) -> TokenSample:
    """Pretraining document: ("text", str) and ("image", grid, gh, gw) segments in order + EOS; all maskable."""
    ids: list[int] = []
    for seg in segments:
        ids += tok.encode(seg[1]) if seg[0] == "text" else image_block(seg[1], seg[2], seg[3], specials, offset)
    return _sample([], ids + [specials.eos], "interleaved", offset, meta or {}, all_maskable=True)


def decode_sequence(ids, tok, specials: SpecialTokens, offset: int) -> list[tuple]:
    """Inverse of the builders: [("text", str) | ("image", grid[gh, gw] of VQ ids)], specials kept in text."""
    ids = np.asarray(ids, dtype=np.int64)
    out: list[tuple] = []
    starts = np.nonzero(ids == specials.image_start)[0]
    cursor = 0
    for s in starts:
        if s < cursor:
            continue
        if s + 4 > len(ids):
            break
        gh, gw = specials.grid_side(ids[s + 1]), specials.grid_side(ids[s + 2])
        if ids[s + 3] != specials.boi:
            raise ValueError(f"position {s + 3}: expected <boi> after the grid tokens, got id {ids[s + 3]}")
        body = ids[s + 4:s + 4 + gh * gw]
        if s > cursor:
            out.append(("text", tok.decode(ids[cursor:s])))
        out.append(("image", (body - offset).reshape(gh, gw) if body.size == gh * gw else body - offset))
        cursor = s + 4 + gh * gw + (1 if s + 4 + gh * gw < len(ids) and ids[s + 4 + gh * gw] ==
                                    specials.image_end else 0)
    if cursor < len(ids):
        out.append(("text", tok.decode(ids[cursor:])))
    return out
