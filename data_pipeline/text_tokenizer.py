"""Text tokenizer: a local HF `tokenizer.json` (the released one works), or a small byte-level BPE built from the
sample text with every special token of the official layout added by name.

The small tokenizer is padded with unused tokens to exactly `vocab_size` ids, so presets can state
`model.image_token_offset = vocab_size` and `model.vocab_size = vocab_size + codebook`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import layout
from training.config_errors import ConfigError

# Grids up to this side get their <|reserved_token_{n}|> in the sample tokenizer (n = 0 .. MAX_GRID).
MAX_GRID = 128


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: encode without implicit specials, decode keeping them."""

    def __init__(self, tok: Tokenizer, path: str = ""):
        self.tok = tok
        self.path = path
        self._fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


def text_tokenizer_path(dcfg) -> Path:
    """The run's tokenizer.json: data.text_tokenizer, else the one `unidiff data make-sample` writes."""
    return Path(dcfg.text_tokenizer) if dcfg.text_tokenizer else Path(dcfg.raw_dir) / "tokenizer.json"


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """Load `tokenizer.json` (or a dir holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"text tokenizer {p} does not exist: set data.text_tokenizer to a tokenizer.json, "
                                f"or run `unidiff data make-sample` which builds one into data.raw_dir")
    return TextTokenizer(Tokenizer.from_file(str(p)), str(p))


def special_token_strings(max_grid: int = MAX_GRID) -> list[str]:
    return list(layout.OFFICIAL_SPECIALS) + [layout.reserved_token(n) for n in range(max_grid + 1)]


def build_sample_tokenizer(texts: list[str], out_path: str | Path, vocab_size: int = 2048,
                           max_grid: int = MAX_GRID) -> TextTokenizer:
    """Train a byte-level BPE on `texts`, add the official special tokens, pad to exactly `vocab_size` ids.

    Byte-level BPE (not WordLevel) so that any text round-trips exactly; on the shapes vocabulary its merges
    make every word of the world a single token.
    """
    specials = special_token_strings(max_grid)
    n_bpe = vocab_size - len(specials)
    if n_bpe < 300:
        raise ValueError(f"data.sample.text_vocab_size={vocab_size} is too small: need >= {len(specials) + 300} "
                         f"({len(specials)} special tokens + 256 bytes + some merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(specials)
    fill = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    # A small corpus yields fewer merges than asked: pad with never-produced tokens so the size is exact.
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(fill)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return TextTokenizer(tok, str(out))


def vocab_layout(tok: TextTokenizer, codebook_size: int, multiple_of: int = 128) -> tuple[int, int]:
    """(image_token_offset, vocab_size): image ids follow the text vocab, rounded up to `multiple_of`.

    For the sample tokenizer (2048 ids) this is exact. For a released checkpoint the model's config.json
    (image_token_offset=157184) is authoritative; the tokenizer file may list fewer ids than the embedding.
    """
    offset = -(-tok.vocab_size // multiple_of) * multiple_of
    return offset, offset + codebook_size


def specials_for(cfg) -> "layout.SpecialTokens | dict":
    """The special token ids of a run: from its text tokenizer, checked against the model's vocab layout.

    Synthetic data (data.synthetic) has no tokenizer: the mask token is the last text id (the synthetic loader
    never emits it)."""
    if cfg.data.synthetic:
        return {"mask": cfg.model.image_token_offset - 1, "eos": 0, "uncondition": cfg.model.image_token_offset - 2}
    path = text_tokenizer_path(cfg.data)
    if not path.exists():
        raise ConfigError(f"data.text_tokenizer: {path} does not exist; run `unidiff data make-sample` first, "
                          f"point data.text_tokenizer at a tokenizer.json, or set data.synthetic=true")
    tok = load_text_tokenizer(path)
    offset, vocab = vocab_layout(tok, cfg.data.image_tokenizer.num_embeddings)
    if cfg.model.image_token_offset < tok.vocab_size or cfg.model.vocab_size < cfg.model.image_token_offset + \
            cfg.data.image_tokenizer.num_embeddings:
        raise ConfigError(f"model.image_token_offset={cfg.model.image_token_offset} / model.vocab_size="
                          f"{cfg.model.vocab_size} do not fit the text tokenizer {path} ({tok.vocab_size} ids) and "
                          f"the {cfg.data.image_tokenizer.num_embeddings}-entry codebook: use "
                          f"model.image_token_offset={offset} model.vocab_size={vocab}")
    return layout.SpecialTokens.from_tokenizer(tok)
