"""Few-step distillation losses for the turbo sampler ("predict clean, re-noise" on the uniform grid t_k = k/K).

The student s keeps the teacher's architecture and velocity output; its clean estimate is
f_s(x, t) = x + (1 - t) s(x, t). Both methods make f_s(x_{t_n}, t_n) agree with the clean image at the end of the
ODE trajectory through x_{t_n} (consistency models, Song et al. 2023), bootstrapping over a fine grid
t_n = n / N, N = K * substeps (the student's sampler uses every substeps-th point). A coarse grid (substeps=1) is
measurably worse for the teacher-free method: the same-noise pair estimate of the ODE step is biased by O(dt),
and at dt = 1/K its fixed point is the blurry posterior mean (tests/test_decoder_flow.py shows it).

  consistency_training (teacher-free; the consistency half of TwinFlow/RCGM, iCT-style target = stop-grad student):
      x_n = t_n x1 + (1-t_n) e,  x_m = t_m x1 + (1-t_m) e  (same e, t_m = t_n + 1/N)
      L = d( f_s(x_n, t_n),  sg f_s(x_m, t_m) )          with f(x_K, 1) := x1
  consistency_distillation (frozen teacher T, CFG baked in):
      x_n as above,  x_m = EulerODE_T(x_n, t_n -> t_m, one step, guidance w)
      L = d( f_s(x_n, t_n),  sg f_s(x_m, t_m) )          with f(x_K, 1) := x_m (the teacher's endpoint)

d is L2 or the pseudo-Huber distance of iCT (c = 0.00054 sqrt(numel per sample)); n is uniform on the fine grid.

  trajectory_distillation (frozen teacher used once, up front; no bootstrapping):
      run the guided teacher's own sampler (Euler, `decoder.steps` on its shifted grid, plus the student's times)
      from noise, keeping its states x_{t_k} at the student's times t_k = k/K and its endpoint x_T;
      L = d( f_s(x_{t_k}, t_k), x_T )
  i.e. every student step regresses what the full teacher sampler ends at from that point (Luhman & Luhman 2021
  knowledge distillation, extended from one step to the K points of the turbo grid). The pool of trajectories is
  built once and reused; the teacher is then dropped. The targets are the teacher's actual outputs, so the student
  cannot drift from its teacher the way a bootstrapped consistency target can.
"""
from __future__ import annotations

import torch

from training.decoder.flow import clean_estimate, interpolate
from training.decoder.latent import latent_shape
from training.decoder.samplers import euler_grid, guided_velocity


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l2":
        return (a - b).pow(2).flatten(1).mean(1).mean()
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt().sub(c).mean()


@torch.no_grad()
def teacher_jump(teacher, x, t0: torch.Tensor, t1: torch.Tensor, ids, substeps: int, cfg_scale: float):
    """Euler ODE of the (guided) teacher from per-sample t0 to t1 in `substeps` equal sub-steps."""
    dt = (t1 - t0) / substeps
    for k in range(substeps):
        t = t0 + k * dt
        x = x + dt.view(-1, 1, 1, 1) * guided_velocity(teacher, x, t, ids, cfg_scale)
    return x


def distill_loss(student, x1: torch.Tensor, ids: torch.Tensor, dcfg, teacher=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One consistency loss on a batch of clean latents x1 [B, C, H, W] with ids [B, gh, gw]."""
    b, K = x1.shape[0], dcfg.steps * dcfg.substeps
    n = torch.randint(0, K, (b,), generator=generator)
    t_n, t_m = (n.float() / K).to(x1.device), ((n + 1).float() / K).to(x1.device)
    e = torch.randn(x1.shape, generator=generator).to(x1)
    x_n = interpolate(x1, e, t_n)
    keep = torch.ones(b, dtype=torch.bool, device=x1.device)
    if dcfg.method == "consistency_distillation":
        if teacher is None:
            raise ValueError("distill.method=consistency_distillation needs a teacher model")
        x_m = teacher_jump(teacher, x_n, t_n, t_m, ids, 1, dcfg.teacher_cfg_scale)
        end = x_m
    else:
        x_m = interpolate(x1, e, t_m)
        end = x1
    with torch.no_grad():
        last = (n + 1 == K).to(x1.device).view(-1, 1, 1, 1)
        inner = ~last.view(-1)
        target = end.clone()
        if inner.any():  # boundary condition f(x, 1) = x: only the inner items need a student evaluation
            tm = t_m[inner]
            target[inner] = clean_estimate(x_m[inner], tm, student(x_m[inner], tm, ids[inner], keep[inner]).float())
    pred = clean_estimate(x_n, t_n, student(x_n, t_n, ids, keep).float())
    return distance(pred, target, dcfg.loss)


@torch.no_grad()
def teacher_trajectory(teacher, noise: torch.Tensor, ids: torch.Tensor, times: list[float], steps: int,
                       shift: float, cfg_scale: float, norm_clip: bool = True):
    """The teacher's guided Euler ODE from `noise` over its own shifted `steps`-step grid with `times` inserted;
    returns (states at `times` [len(times), B, ...], endpoint at t=1)."""
    grid = sorted(set(euler_grid(steps, shift).tolist()) | {float(t) for t in times} | {0.0, 1.0})
    want = {float(t): i for i, t in enumerate(times)}
    states = [None] * len(times)
    x = noise.float()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        if t0 in want:
            states[want[t0]] = x.clone()
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * guided_velocity(teacher, x, t, ids, cfg_scale, norm_clip)
    return torch.stack(states), x


class TrajectoryPool:
    """(state, time, ids, endpoint) tuples from teacher trajectories, sampled uniformly over items and times."""

    def __init__(self, states: torch.Tensor, times: list[float], ids: torch.Tensor, ends: torch.Tensor):
        self.states, self.ids, self.ends = states, ids, ends  # [K, N, ...], [N, gh, gw], [N, ...] on one device
        self.times = torch.tensor(times, dtype=torch.float32, device=states.device)

    @classmethod
    def build(cls, teacher, batches, n_items: int, tcfg, dcfg, generator: torch.Generator, progress=None):
        times = [k / dcfg.steps for k in range(dcfg.steps)]
        parts, ids_all, ends = [], [], []
        while sum(i.shape[0] for i in ids_all) < n_items:
            _, ids = next(batches)  # only the conditions: the teacher draws the images
            noise = torch.randn((ids.shape[0], *latent_shape(tcfg)), generator=generator).to(ids.device)
            st, end = teacher_trajectory(teacher, noise, ids, times, tcfg.steps, tcfg.sample_shift,
                                         dcfg.teacher_cfg_scale, tcfg.cfg_norm_clip)
            parts.append(st)
            ids_all.append(ids)
            ends.append(end)
            if progress is not None:
                progress(ids.shape[0])
        return cls(torch.cat(parts, 1)[:, :n_items], times, torch.cat(ids_all)[:n_items], torch.cat(ends)[:n_items])

    def sample(self, b: int, generator: torch.Generator):
        # drawn on the CPU generator (the same stream on every device), then moved to the pool's device
        i = torch.randint(0, self.ids.shape[0], (b,), generator=generator).to(self.states.device)
        k = torch.randint(0, self.states.shape[0], (b,), generator=generator).to(self.states.device)
        return self.states[k, i], self.times[k], self.ids[i], self.ends[i]


def trajectory_loss(student, pool: TrajectoryPool, b: int, kind: str, generator: torch.Generator | None = None):
    x, t, ids, end = pool.sample(b, generator)
    keep = torch.ones(b, dtype=torch.bool, device=x.device)
    return distance(clean_estimate(x, t, student(x, t, ids, keep).float()), end, kind)
