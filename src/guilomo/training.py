"""The training loop of SFT, the search and the demo. The caller brings one step (forward,
backward, optimiser) and how to save; `run_steps` does the seeding (`step_seed`: a resumed
run draws the dropout of the uninterrupted one), the progress bar, the step hook and the
checkpoint cadence the same way for all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from .distributed import barrier, step_seed, world


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total`.
    (Hand-written: transformers' get_linear_schedule_with_warmup gives step 0 a learning
    rate of 0, a step that trains nothing; this one starts at lr / warmup.)"""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def save_point(save: Callable[[], None], on_checkpoint: Callable[[], None] | None) -> None:
    """Save on every process (FSDP gathers, rank 0 writes), then `on_checkpoint()` on rank 0
    (e.g. the push to the object store), then wait, so that no process reads or resumes a
    half-written checkpoint."""
    save()
    if on_checkpoint is not None and world()[0] == 0:
        on_checkpoint()
    barrier()


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"


def run_steps(
    step: Callable[[int], dict[str, float]],
    *,
    start: int,
    end: int,
    seed: int,
    desc: str,
    shown: Sequence[str] = ("loss",),
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,  # stages.StepHook
    save: Callable[[], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[], None] | None = None,
) -> None:
    """Steps `start` .. `end` - 1 of `step(i) -> metrics`, each after reseeding the RNG. The
    bar (rank 0) shows the metrics in `shown`; `on_step(i + 1, metrics)` follows each step on
    rank 0; with `save`, a `save_point` follows the last and every `checkpoint_every`-th step."""
    rank = world()[0]
    bar = tqdm(range(start, end), desc=desc, disable=not progress or rank != 0, mininterval=0.5)
    for i in bar:
        torch.manual_seed(step_seed(seed, i, rank))
        metrics = step(i)
        bar.set_postfix({k: _short(metrics[k]) for k in shown if k in metrics})
        if on_step is not None and rank == 0:
            on_step(i + 1, metrics)
        due = i + 1 == end or (checkpoint_every > 0 and (i + 1) % checkpoint_every == 0)
        if save is not None and due:
            save_point(save, on_checkpoint)
