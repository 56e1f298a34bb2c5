"""The decoder stages under the rehearsal: one rank of a fake data-parallel world on a fake CUDA device, running what
a `train-decoder` and a `distill` step compute before their backward — the stage engine (training/decoder/train.py
`stage_engine`) over the decoder, a batch moved by the stages' own `_on`, the flow-matching loss, the teacher's
trajectory pool, the trajectory and consistency losses — and recording every op that mixes devices and every
collective handed a host tensor (training/rehearsal/dispatch.py). The backward is not rehearsed (autograd on fake
CUDA aborts the CPU build); its ops run on the devices of the forward's tensors.

    python -m training.rehearsal.decoder_pass WORLD CONFIG [overrides...]  ->  one JSON line (REHEARSAL {...})
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from training import accelerator
from training.config import load_config
from training.decoder import train as stages
from training.decoder.distill import TrajectoryPool, distill_loss, trajectory_loss
from training.decoder.flow import flow_loss
from training.decoder.latent import build_latent
from training.decoder.pairs import batches, decoder_pairs
from training.rehearsal.dispatch import Audit, RehearsalMode, where
from training.rehearsal.guards import DeviceGuardFree
from training.rehearsal.passes import _init_fake_world


def decoder_device_pass(cfg, world_size: int) -> dict:
    d, dc = cfg.decoder, cfg.distill
    _init_fake_world(0, world_size, min(world_size, 8), d.seed)
    audit = Audit()
    host = list(itertools.islice(batches(decoder_pairs(d, "train", 0, world_size, cfg.data), d.batch_size), 2))
    # torch's broadcast asks the fake GPU's compute capability (fp8 handling): answer as an H100 would
    with accelerator.rehearse_cuda(), mock.patch.object(torch.cuda, "get_device_capability", lambda *a: (9, 0)):
        device = accelerator.device_for(0)
        with FakeTensorMode(allow_non_fake_inputs=True), RehearsalMode(device, {}, audit), DeviceGuardFree(audit), \
                torch.no_grad():
            with torch.device(device):  # fake weights cannot be moved by Module.to: create them on the device
                model = stages.build_decoder(d)
            engine = stages.stage_engine(cfg, model, d, "native", 0)
            data = stages._on(engine.world.device, iter(host))
            gen = torch.Generator().manual_seed(d.seed)
            try:
                images, ids = next(data)
                flow_loss(engine.model, build_latent(d, engine.world.device).encode(images), ids, d, gen)
                pool = TrajectoryPool.build(model, data, 1, d, dc, gen)
                trajectory_loss(engine.model, pool, 2, dc.loss, gen)
                distill_loss(engine.model, images, ids, dc, model, gen)
            except RuntimeError as e:  # a mismatch the mode cannot re-run past (an in-place op into a host tensor)
                audit.violations.append({"what": "step aborted", "detail": str(e).splitlines()[0], "where": where()})
    return {"pass": "decoder-device", "world_size": world_size, **audit.summary()}


def main(argv: list[str]) -> int:
    world, path, *overrides = argv
    out = decoder_device_pass(load_config(path or None, overrides), int(world))
    sys.stdout.write("REHEARSAL " + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no atexit handler may touch the fake process group


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
