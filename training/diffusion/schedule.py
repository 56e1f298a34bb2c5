"""Block-size schedule: LLaDA2.0's warmup-stable-decay over the block size (1 -> 4 -> 32 -> 64 -> L -> ... -> 32).

Given as [[step, block_size], ...]; from `step` on `block_size` is used. 0 (or any size >= seq_len) means the whole
sequence, i.e. MDLM, where only the x_t half is fed to the model.
"""
from __future__ import annotations

from training.config_errors import ConfigError


def validate_block_schedule(schedule, seq_len: int) -> None:
    if not schedule:
        raise ConfigError("diffusion.block_schedule=[] is not allowed: must list at least one [step, block_size]")
    prev = -1
    for i, entry in enumerate(schedule):
        if len(entry) != 2:
            raise ConfigError(f"diffusion.block_schedule[{i}]={list(entry)} is not allowed: must be [step, block_size]")
        step, size = int(entry[0]), int(entry[1])
        if i == 0 and step != 0:
            raise ConfigError(f"diffusion.block_schedule[0]={list(entry)} is not allowed: the first entry must start "
                              f"at step 0")
        if step <= prev:
            raise ConfigError(f"diffusion.block_schedule[{i}]={list(entry)} is not allowed: steps must increase "
                              f"(previous step {prev})")
        prev = step
        if size < 0 or (0 < size < seq_len and seq_len % size):
            raise ConfigError(f"diffusion.block_schedule[{i}]={list(entry)} is not allowed: block_size must divide "
                              f"train.seq_len={seq_len} (or be 0 / >= seq_len for the whole sequence)")


def whole_sequence(block_size: int, length: int) -> bool:
    """The one rule: block size 0 or >= the sequence length is MDLM (x_t alone under the document mask)."""
    return block_size <= 0 or block_size >= length


def block_size_at(schedule, step: int, seq_len: int) -> int:
    """The block size in force at `step`; returns seq_len for the whole-sequence (MDLM) setting."""
    size = int(schedule[0][1])
    for s, b in schedule:
        if step >= int(s):
            size = int(b)
        else:
            break
    return seq_len if whole_sequence(size, seq_len) else size


def final_block_size(schedule) -> int:
    """The block size training ends with (0: whole sequence): what evaluation scores by default."""
    return int(schedule[-1][1])


def pad_multiple(schedule, seq_len: int) -> int | None:
    """What documents are padded to a multiple of (data.pad_to_block) so that no block of any size the schedule
    uses straddles two documents: the least common multiple of its block sizes below seq_len (None: MDLM only)."""
    import math

    sizes = [int(b) for _, b in schedule if not whole_sequence(int(b), seq_len)]
    if not sizes:
        return None
    lcm = math.lcm(*sizes)
    return lcm if lcm < seq_len else None
