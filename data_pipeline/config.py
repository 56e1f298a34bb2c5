"""Config section `data`: where raw and token shards live and how sequences are packed and loaded."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    raw_dir: str = "data/raw"  # raw WebDataset shards (train/ and val/), e.g. from `unidiff data make-sample`
    token_dir: str = "data/tokens"  # token shards + manifest.json written by `unidiff pretokenize`
    text_tokenizer: str = ""  # path to a HF tokenizer.json; empty: the one built into token_dir by make-sample
    synthetic: bool = False  # train on seeded synthetic token data (no shards needed)
    num_workers: int = 0

    def validate(self, root) -> None:
        pass
