"""Config section `data`: where raw and token shards live, the tokenizers, and how sequences are packed and loaded."""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config_errors import ConfigError


@dataclass
class ImageTokenizerConfig:
    """SigLIP-VQ image tokenizer. Tiny defaults; the released one is loaded by pointing `path` at its dir."""

    path: str = "data/image_tokenizer"  # dir in the official layout (config.json, preprocessor_config.json, *.safetensors)
    vit_init: str = ""  # fit-codebook: load the ViT from this tokenizer dir; empty = seeded random ViT
    seed: int = 0  # seed of the random ViT / codebook init
    patch_size: int = 8  # pixels per patch side (released: 16)
    hidden_size: int = 64  # ViT width (released: 1536)
    intermediate_size: int = 128  # ViT MLP width (released: 6144)
    num_heads: int = 4
    depth: int = 2  # ViT blocks (released: 40)
    image_size: int = 64  # side of the learned position table in pixels: (image_size/patch)^2 rows (released: 2048)
    num_embeddings: int = 256  # codebook entries (released: 16384)
    embed_dim: int = 32  # codebook vector width (released: 2048)
    # Understanding resize (Qwen2.5-VL smart_resize): sides multiple of resize_factor, area in [min_pixels, max_pixels].
    resize_factor: int = 16  # pixels (released: 32 = 2 x patch)
    min_pixels: int = 32 * 32  # (released: 128^2)
    max_pixels: int = 128 * 128  # (released: 800^2)
    # Generation targets: var_center_crop to the factor lattice with at most gen_max_patches (factor x factor) cells.
    gen_max_patches: int = 16  # (released: 256 -> 512x512)
    batch_size: int = 64  # images per tokenizer forward (grouped by grid size)
    # fit-codebook (spherical k-means)
    kmeans_iters: int = 25
    kmeans_max_features: int = 200_000  # feature vectors sampled for k-means

    def validate(self, root) -> None:
        p = "data.image_tokenizer"
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{p}.hidden_size={self.hidden_size} is not allowed: must be divisible by "
                              f"{p}.num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{p}.image_size={self.image_size} is not allowed: must be a multiple of "
                              f"{p}.patch_size={self.patch_size}")
        if self.resize_factor % self.patch_size:
            raise ConfigError(f"{p}.resize_factor={self.resize_factor} is not allowed: must be a multiple of "
                              f"{p}.patch_size={self.patch_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"{p}.min_pixels={self.min_pixels} is not allowed: must be in (0, "
                              f"{p}.max_pixels={self.max_pixels}]")
        if self.num_embeddings < 2 or self.batch_size < 1 or self.gen_max_patches < 1:
            raise ConfigError(f"{p}: num_embeddings={self.num_embeddings} (>= 2), batch_size={self.batch_size} "
                              f"(>= 1), gen_max_patches={self.gen_max_patches} (>= 1) out of range")


@dataclass
class SampleConfig:
    """`unidiff data make-sample`: the bundled raw data (real photos from installed wheels + the shapes world)."""

    seed: int = 0
    image_size: int = 64  # shapes-world image side, pixels
    photo_max_side: int = 128  # real photos are resized down to this longest side, pixels
    train_scenes: int = 3000  # shapes scenes in the train split (each gives a caption pair and a VQA sample)
    val_scenes: int = 300
    vqa_turns: int = 1  # questions per train-scene VQA sample (a multi-turn conversation; val stays single-turn)
    train_docs: int = 300  # multi-image interleaved shapes documents
    val_docs: int = 30
    shards_per_split: int = 4
    text_vocab_size: int = 2048  # the sample text tokenizer is padded to exactly this many ids


@dataclass
class DataConfig:
    raw_dir: str = "data/raw"  # raw WebDataset shards (train/ and val/), e.g. from `unidiff data make-sample`
    # Raw shards as URLs or brace patterns (local path, file:, pipe:CMD, http(s)://; docs/data.md). When either list
    # is set, the raw_dir folders are not read (raw_dir/tokenizer.json still is the default text tokenizer).
    train_shards: list[str] = field(default_factory=list)  # e.g. ["pipe:aws s3 cp s3://b/train-{000000..000099}.tar -"]
    val_shards: list[str] = field(default_factory=list)
    token_dir: str = "data/tokens"  # token shards + manifest.json written by `unidiff pretokenize`
    text_tokenizer: str = ""  # path to a HF tokenizer.json; empty: <raw_dir>/tokenizer.json written by make-sample
    synthetic: bool = False  # train on seeded synthetic token data (no shards needed)
    synthetic_vocab_size: int = 2304  # synthetic mode when only the data section is given: ids in [0, this)
    num_workers: int = 0  # loader worker processes (0: in the main process)
    # pretokenize: CPU processes (read, decode, resize, write) beside each image tokenizer process (one per GPU, or
    # one on a CPU-only machine); 0: the CPU cores left, divided between the tokenizer processes
    pretokenize_workers: int = 0
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # pretokenize: raw -> token samples
    caption_tasks: list[str] = field(default_factory=lambda: ["caption", "t2i"])  # token samples per caption pair
    t2i_uncond_prob: float = 0.1  # share of t2i samples whose caption is replaced by <uncondition> (for CFG)
    max_input_pixels: int = 4096 * 4096  # raw images above this are quarantined (decompression-bomb guard)
    max_aspect: float = 20.0  # raw images with max(w,h)/min(w,h) above this are quarantined
    # store every image's generation-crop VQ ids (+ a pointer to its raw bytes) for the diffusion decoder's
    # training pairs (decoder.data_source=shards); costs one tokenizer forward per image that has no t2i sample
    decoder_pairs: bool = True
    # loader
    datasets: dict[str, float] = field(default_factory=dict)  # name -> mixing weight; token_dir/<split> sub-datasets;
    # empty: every dataset in the manifest, weighted by its size
    split: str = "train"  # which split the training loader reads
    # pad each document with maskable EOS to a multiple of every block size of diffusion.block_schedule (their
    # lcm), so no block straddles two documents (LLaDA2.0); costs the padding tokens
    pad_to_block: bool = False
    drop_too_long: bool = True  # documents with an image longer than seq_len are dropped (counted); False: error

    def validate(self, root) -> None:
        self.image_tokenizer.validate(root)
        for t in self.caption_tasks:
            if t not in ("caption", "t2i"):
                raise ConfigError(f"data.caption_tasks contains {t!r}: allowed are 'caption' and 't2i'")
        if not 0.0 <= self.t2i_uncond_prob <= 1.0:
            raise ConfigError(f"data.t2i_uncond_prob={self.t2i_uncond_prob} is not allowed: must be in [0, 1]")
        if self.max_aspect < 1.0:
            raise ConfigError(f"data.max_aspect={self.max_aspect} is not allowed: must be >= 1")
        if self.num_workers < 0 or self.pretokenize_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} / data.pretokenize_workers="
                              f"{self.pretokenize_workers} is not allowed: must be >= 0")
        for name, w in self.datasets.items():
            if not w > 0:
                raise ConfigError(f"data.datasets.{name}={w} is not allowed: mixing weights must be > 0")
        if self.split not in ("train", "val"):
            raise ConfigError(f"data.split={self.split} is not allowed: must be train | val")
        for key in ("train_shards", "val_shards"):
            for u in getattr(self, key):
                if not (isinstance(u, str) and u.strip()):
                    raise ConfigError(f"data.{key} contains {u!r}: each entry must be a non-empty URL or path")
