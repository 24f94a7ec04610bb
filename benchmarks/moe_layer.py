"""Forward+backward cost of the LoRA-MoE layer against the base linear, plain LoRA and a MoLA loop.

What it measures, side by side in one run, per case (a base `nn.Linear` shape and an expert
allocation: top-2 of 8 experts, uniform rank 8 or heterogeneous ranks [4,4,6,6,8,10,12,14]):

* ``base``    the frozen ``nn.Linear`` alone, the input requiring grad (fine-tuning: the base
              weight is frozen but the gradient flows on to the layer below);
* ``guilomo`` ``guilomo.moe.LoraMoeLinear`` with its fused expert path (two thin matmuls over
              the concatenated experts; lora_A, lora_B and the router trainable);
* ``matmuls`` guilomo's matrix products alone (its no-dropout path, routing fixed in advance):
              the cost of the layer if routing and elementwise work were free;
* ``lora``    plain LoRA at the same *active* rank (top_k * mean rank = 16):
              ``y = base(x) + (x @ A.T) @ B.T * alpha / r``;
* ``mola``    the MoLA research code's method: router -> softmax -> top-k renormalised, then a
              Python loop over the experts gathering the tokens routed to each one, running that
              expert's ``B_e(A_e(x_e)) * alpha / r_e``, weighting it and ``index_add_``-ing it back.

With ``--dropout P`` (default 0) every method but ``base`` trains with dropout P on the adapter's
input, as the research recipes do (MoLA and our SFT default: 0.05): guilomo and plain LoRA
drop the layer input once, the MoLA loop drops each expert's gathered tokens (its
``lora_dropout`` module per expert call). The equality check runs with dropout off.

One iteration is: zero the grads (set_to_none), forward, ``y.backward(g)`` with one fixed random
``g``. All five methods share the same base layer, the same ``x`` and the same ``g``. After two
warm-up iterations each, the methods are timed round-robin (the starting method rotates every
round). Each ratio is the median over the rounds of that round's ratio (e.g. mola / guilomo of
the same round), so slow drift of the machine's speed cancels; the ms columns are the medians
per method. Before timing, each case checks that the guilomo output (and input gradient)
equals the MoLA loop's for the same weights, so the comparison is apples to apples; the run
aborts otherwise.

Reported ratios: ``vs_base`` = guilomo / base, ``vs_matmuls`` = guilomo / matmuls,
``matmuls_vs_base`` = matmuls / base, ``vs_lora`` = guilomo / lora and
``mola_loop_speedup`` = mola / guilomo. Targets on CPU (2 threads, fp32): vs_base <= 1.10 at the
4096 sizes, vs_base <= 1.45 at d=1024 and mola_loop_speedup >= 1.6 at d=1024. The last line
printed on stdout is one JSON object with the ratios, the targets and whether they are met;
progress goes to stderr.

Run:  ``make bench``  or  ``.venv/bin/python benchmarks/moe_layer.py [--quick] [--device cuda]``
(on CUDA the run uses bf16 and synchronises around every timed iteration).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from guilomo.moe import Allocation, LoraMoeLinear, ModuleAllocation, MoeConfig

EXPERTS = 8
TOP_K = 2
UNIFORM_RANKS = [8] * EXPERTS
HETERO_RANKS = [4, 4, 6, 6, 8, 10, 12, 14]
METHODS = ("base", "guilomo", "matmuls", "lora", "mola")

LOAD_WARN = 0.2  # cores used by other processes above which a case is flagged as disturbed

TARGETS = {
    "vs_base_4096_max": 1.10,
    "vs_base_1024_max": 1.45,
    "mola_loop_speedup_1024_min": 1.6,
}


@dataclass(frozen=True)
class Case:
    d_in: int
    d_out: int
    ranks_name: str
    tokens: int
    rounds: int

    @property
    def name(self) -> str:
        return f"{self.d_in}x{self.d_out}/{self.ranks_name}"

    @property
    def ranks(self) -> list[int]:
        return UNIFORM_RANKS if self.ranks_name == "uniform" else HETERO_RANKS

    @property
    def small(self) -> bool:
        return self.d_in <= 1024 and self.d_out <= 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The five methods. Each is an nn.Module mapping x (N, d_in) -> y (N, d_out); the base layer is
# the same frozen module in all of them.
# --------------------------------------------------------------------------------------------


class BaseOnly(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


class PlainLora(nn.Module):
    """y = base(x) + (x A^T) B^T * alpha / r, one adapter of rank r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout)
        dt, dev = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dt, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(
            torch.randn(base.out_features, rank, dtype=dt, device=dev) * 0.01
        )
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(self.dropout(x), self.lora_A)
        return self.base(x) + F.linear(u, self.lora_B) * self.scale


class MolaLoop(nn.Module):
    """MoLA's method: top-k routing, then a loop over experts on the tokens routed to each.

    Experts are separate ``nn.Linear`` pairs (A_e: d_in -> r_e, B_e: r_e -> d_out), scaled by
    alpha / r_e. The weights are copied from a `LoraMoeLinear` so both compute the same function.
    """

    def __init__(
        self, base: nn.Linear, moe: LoraMoeLinear, alpha: float, top_k: int, dropout: float
    ) -> None:
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout)
        self.top_k = top_k
        d_in, d_out = base.in_features, base.out_features
        dt, dev = moe.lora_A.dtype, moe.lora_A.device
        ranks = list(moe.ranks)
        self.router = nn.Linear(
            d_in, len(ranks), bias=False, device=dev, dtype=moe.router.weight.dtype
        )
        self.experts_A = nn.ModuleList()
        self.experts_B = nn.ModuleList()
        self.scales = [alpha / r for r in ranks]
        with torch.no_grad():
            self.router.weight.copy_(moe.router.weight)
            start = 0
            for r in ranks:
                a = nn.Linear(d_in, r, bias=False, device=dev, dtype=dt)
                b = nn.Linear(r, d_out, bias=False, device=dev, dtype=dt)
                a.weight.copy_(moe.lora_A[start : start + r])
                b.weight.copy_(moe.lora_B[:, start : start + r])
                self.experts_A.append(a)
                self.experts_B.append(b)
                start += r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        logits = self.router(x).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(result)
        # As the research code (and the HF Mixtral block of its time) does: a one-hot expert
        # mask, then per expert the routed tokens as host-side index lists (a sync per expert)
        expert_mask = F.one_hot(top_idx, len(self.scales)).permute(2, 1, 0)  # (E, k, N)
        for e in range(len(self.scales)):
            slot, token_idx = torch.where(expert_mask[e])
            if token_idx.shape[0] == 0:
                continue
            token_list, slot_list = token_idx.tolist(), slot.tolist()
            x_e = x[None, token_list].reshape(-1, x.shape[-1])
            y_e = self.experts_B[e](self.experts_A[e](self.dropout(x_e))) * self.scales[e]
            y_e = y_e * top_w[token_list, slot_list, None].to(y_e.dtype)
            out.index_add_(0, token_idx, y_e)
        return result + out


class _Matmuls(torch.autograd.Function):
    """The fused layer's products without dropout: y = x W0^T + ((x C^T)[:, :R] * G) B^T,
    C = [A; W_router], G the fixed (N, R) gate; backward: grad_B, grad_C and grad_x."""

    @staticmethod
    def forward(ctx, x, w0, c, b, gate):
        rank = b.shape[1]
        u = (x @ c.t())[:, :rank] * gate
        ctx.save_for_backward(x, w0, c, b, gate, u)
        return (x @ w0.t()).addmm_(u, b.t())

    @staticmethod
    def backward(ctx, g):
        x, w0, c, b, gate, u = ctx.saved_tensors
        grad_b = (u.t() @ g).t()
        grad_z = torch.cat([(g @ b) * gate, g.new_zeros(g.shape[0], c.shape[0] - b.shape[1])], 1)
        grad_x = (g @ w0).addmm_(grad_z, c)
        grad_c = (x.t() @ grad_z).t()
        return grad_x, None, grad_c, grad_b, None


class Matmuls(nn.Module):
    """The matrix products of guilomo's no-dropout path alone, for a routing drawn once."""

    def __init__(self, base: nn.Linear, moe: LoraMoeLinear, tokens: int) -> None:
        super().__init__()
        self.base = base
        self.c = nn.Parameter(torch.cat([moe.lora_A, moe.router.weight]).detach().clone())
        self.b = nn.Parameter(moe.lora_B.detach().clone())
        experts = len(moe.ranks)
        chosen = torch.rand(tokens, experts).topk(TOP_K, dim=-1).indices
        weights = torch.zeros(tokens, experts).scatter_(1, chosen, 1.0 / TOP_K)
        self.register_buffer("gate", weights.to(moe.gate_to_cols) @ moe.gate_to_cols)  # (N, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmuls.apply(x, self.base.weight, self.c, self.b, self.gate)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = module(x)
        y.backward(g)

    return step


def build_case(
    case: Case, device: torch.device, dtype: torch.dtype, alpha: float, dropout: float
) -> dict:
    """The five modules of one case, sharing one frozen base layer, plus x and g."""
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    alloc = ModuleAllocation(experts=EXPERTS, top_k=TOP_K, ranks=case.ranks)
    cfg = MoeConfig(
        allocation=Allocation(base_model="bench", modules={"m": alloc}),
        lora_alpha=alpha,
        lora_dropout=dropout,
    )
    moe = LoraMoeLinear(
        base_layer=base, name="m", allocation=alloc, config=cfg, state=None, expert_impl="fused"
    )
    moe.to(device)
    with torch.no_grad():
        moe.lora_B.normal_(0, 0.01)  # B starts at zero; a trained adapter's is not
    active_rank = round(TOP_K * sum(case.ranks) / len(case.ranks))
    modules = {
        "base": BaseOnly(base),
        "guilomo": moe,
        "matmuls": Matmuls(base, moe, case.tokens).to(device),
        "lora": PlainLora(base, active_rank, alpha, dropout),
        "mola": MolaLoop(base, moe, alpha, TOP_K, dropout),
    }
    x = torch.randn(case.tokens, case.d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(case.tokens, case.d_out, device=device, dtype=dtype)
    return {"modules": modules, "x": x, "g": g, "active_rank": active_rank}


def flop_floor(case: Case) -> float:
    """guilomo's FLOPs over the base layer's, forward+backward: the best ratio it can reach.

    Base: y = x W0^T and grad_x = g W0 (W0 frozen), 2 N d_in d_out multiply-adds each. The fused
    experts run all R = sum(ranks) rank columns on every token: A and B forward, grad_B,
    grad_(u*g), grad_A and grad_x through A, 3 N R (d_in + d_out); the router 3 N d_in E.
    """
    r, e = sum(case.ranks), len(case.ranks)
    extra = 3 * r * (case.d_in + case.d_out) + 3 * e * case.d_in
    return 1.0 + extra / (2 * case.d_in * case.d_out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_equal(built: dict, case: Case, tol: float) -> dict[str, float]:
    """guilomo and the MoLA loop compute the same output and input gradient (dropout off);
    abort otherwise. The modules are left in training mode, as they are timed."""
    mods, x, g = built["modules"], built["x"], built["g"]
    outs, grads = {}, {}
    for m in mods.values():
        m.eval()
    for name in ("base", "guilomo", "mola"):
        x.grad = None
        y = mods[name](x)
        y.backward(g)
        outs[name], grads[name] = y.detach(), x.grad.detach().clone()
    x.grad = None
    for m in mods.values():
        m.zero_grad(set_to_none=True)
        m.train()
    err = {
        "output": rel_err(outs["guilomo"], outs["mola"]),
        "delta": rel_err(outs["guilomo"] - outs["base"], outs["mola"] - outs["base"]),
        "input_grad": rel_err(grads["guilomo"], grads["mola"]),
    }
    # The LoRA part must not be negligible, or the check would only compare the base layer.
    delta_share = rel_err(outs["mola"], outs["base"])
    if (
        delta_share < 1e-3
        or any(v > tol for v in err.values())
        or any(math.isnan(v) for v in err.values())
    ):
        raise SystemExit(
            f"ABORT: {case.name}: guilomo and the MoLA loop disagree for the same weights "
            f"(relative errors {err}, tolerance {tol}; LoRA share of output {delta_share:.2e}). "
            "The timings would not compare the same computation."
        )
    return err


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Average number of cores used by *other* processes while a case was being timed.

    Other work on the same cores (e.g. a test run) slows the many small ops of the MoLA loop
    far more than one big matmul, so ratios measured under load are not comparable.
    """

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = (
            busy_cpu_seconds(),
            time.process_time(),
            time.perf_counter(),
        )

    def cores(self) -> float | None:
        busy1 = busy_cpu_seconds()
        if busy1 is None or self.busy0 is None:
            return None
        own = time.process_time() - self.own0
        wall = time.perf_counter() - self.wall0
        return max(0.0, (busy1 - self.busy0 - own) / wall)


def time_case(built: dict, case: Case, device: torch.device, warmup: int) -> dict[str, list[float]]:
    steps = {n: make_step(m, built["x"], built["g"]) for n, m in built["modules"].items()}
    for name in METHODS:
        for _ in range(warmup):
            steps[name]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in METHODS}
    for r in range(case.rounds):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
        log(
            f"  round {r + 1}/{case.rounds}: "
            + "  ".join(f"{n}={samples[n][-1] * 1e3:.1f}ms" for n in METHODS)
        )
    return samples


def paired(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over the rounds of num's time / den's time in the same round."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def profile_guilomo(built: dict, rows: int) -> None:
    """Top ops by self CPU time of the fused layer's forward+backward (to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(built["modules"]["guilomo"], built["x"], built["g"])
    step()
    acts = [ProfilerActivity.CPU]
    if built["x"].is_cuda:
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
    key = "self_cuda_time_total" if built["x"].is_cuda else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=key, row_limit=rows))


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cpu (fp32) or cuda (bf16)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens N for every case (default 2048 at d=1024, 512 at the 4096 sizes)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per case (default 21 at d=1024, 15 at 4096)",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="warm-up iterations per method (default 2)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a quarter of the tokens, 3 rounds at d=1024 and 2 at 4096",
    )
    p.add_argument(
        "--cases",
        default="",
        help="only cases whose name contains one of these comma-separated strings, e.g. 1024,hetero",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print (stderr) torch.profiler's top ops of guilomo's forward+backward per case",
    )
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (default 16)")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout on the adapters' input while timing (default 0; the recipes train with 0.05)",
    )
    return p.parse_args(argv)


def make_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    for d_in, d_out in ((1024, 1024), (4096, 4096), (4096, 11008)):
        small = d_in <= 1024
        tokens = 2048 if small else 512
        rounds = 21 if small else 15
        if args.quick:
            tokens, rounds = tokens // 4, (3 if small else 2)
        if args.tokens is not None:
            tokens = args.tokens
        if args.rounds is not None:
            rounds = args.rounds
        for ranks_name in ("uniform", "hetero"):
            cases.append(Case(d_in, d_out, ranks_name, tokens, rounds))
    wanted = [w for w in args.cases.split(",") if w]
    if wanted:
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(
        f"device={device_name} dtype={str(dtype).removeprefix('torch.')} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    results: dict[str, dict] = {}
    rows = []
    for case in make_cases(args):
        log(
            f"[{time.perf_counter() - t_start:6.1f}s] {case.name}: N={case.tokens}, rounds={case.rounds}"
        )
        built = build_case(case, device, dtype, args.alpha, args.dropout)
        err = check_equal(built, case, tol)
        log(
            f"  guilomo == mola loop: rel. errors {', '.join(f'{k} {v:.1e}' for k, v in err.items())}"
        )
        load = OtherLoad()
        samples = time_case(built, case, device, args.warmup)
        other = load.cores()
        if other is not None and other > LOAD_WARN:
            log(
                f"  WARNING: other processes used {other:.2f} cores while {case.name} was timed; "
                "its ratios are not reliable (re-run on an idle machine)"
            )
        if args.profile:
            profile_guilomo(built, rows=15)
        med = {n: statistics.median(s) for n, s in samples.items()}
        spread = {
            n: (max(s) - min(s)) / statistics.median(s) if len(s) > 1 else 0.0
            for n, s in samples.items()
        }
        res = {
            "tokens": case.tokens,
            "active_rank": built["active_rank"],
            "flop_floor_vs_base": round(flop_floor(case), 3),
            "ms": {n: round(v * 1e3, 2) for n, v in med.items()},
            "vs_base": round(paired(samples, "guilomo", "base"), 3),
            "vs_matmuls": round(paired(samples, "guilomo", "matmuls"), 3),
            "matmuls_vs_base": round(paired(samples, "matmuls", "base"), 3),
            "vs_lora": round(paired(samples, "guilomo", "lora"), 3),
            "mola_loop_speedup": round(paired(samples, "mola", "guilomo"), 3),
            "spread": {n: round(v, 3) for n, v in spread.items()},
            "other_load_cores": None if other is None else round(other, 2),
        }
        results[case.name] = res
        rows.append((case, res))
        del built

    # Readable table (stdout), then the JSON line.
    header = (
        f"{'case':<22}{'N':>6}  {'base ms':>9}{'guilomo':>9}{'matmuls':>9}{'lora':>9}{'mola':>9}"
        f"  {'/base':>7}{'(floor)':>8}{'/matmuls':>9}{'/lora':>7}{'mola/guilomo':>13}"
        f"  {'spread':>7}{'load':>6}"
    )
    print(
        f"device={device_name} dtype={str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()}"
    )
    print(header)
    print("-" * len(header))
    for case, r in rows:
        ms = r["ms"]
        load = r["other_load_cores"]
        print(
            f"{case.name:<22}{case.tokens:>6}  {ms['base']:>9.1f}{ms['guilomo']:>9.1f}"
            f"{ms['matmuls']:>9.1f}{ms['lora']:>9.1f}{ms['mola']:>9.1f}"
            f"  {r['vs_base']:>6.3f}x{r['flop_floor_vs_base']:>7.3f}x{r['vs_matmuls']:>8.3f}x"
            f"{r['vs_lora']:>6.3f}x{r['mola_loop_speedup']:>12.2f}x"
            f"  {max(r['spread'].values()):>6.0%}{'?' if load is None else format(load, '.2f'):>6}"
        )
    print(
        "spread = (max - min) / median over the timed rounds, worst method; /base, /matmuls and "
        "/lora are guilomo's time over theirs (lower is better), medians of per-round ratios;\n"
        "(floor) = guilomo's FLOPs over base's; matmuls = guilomo's matrix products alone; "
        "load = cores used by other processes while the case was timed."
    )
    disturbed = [c.name for c, r in rows if (r["other_load_cores"] or 0.0) > LOAD_WARN]
    if disturbed:
        print(
            f"WARNING: other processes were using the CPU during {', '.join(disturbed)}: "
            "those ratios are unreliable; re-run on an idle machine."
        )

    small = [r for c, r in rows if c.small]
    large = [r for c, r in rows if not c.small]
    met = {
        "vs_base_4096": all(r["vs_base"] <= TARGETS["vs_base_4096_max"] for r in large)
        if large
        else None,
        "vs_base_1024": all(r["vs_base"] <= TARGETS["vs_base_1024_max"] for r in small)
        if small
        else None,
        "mola_loop_speedup_1024": all(
            r["mola_loop_speedup"] >= TARGETS["mola_loop_speedup_1024_min"] for r in small
        )
        if small
        else None,
    }
    met["all"] = all(v for v in met.values() if v is not None)
    elapsed = time.perf_counter() - t_start
    log(f"total {elapsed:.1f}s")
    summary = {
        "device": device.type,
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "dropout": args.dropout,
        "torch": torch.__version__,
        "cases": {
            name: {
                k: r[k]
                for k in (
                    "vs_base",
                    "vs_matmuls",
                    "matmuls_vs_base",
                    "vs_lora",
                    "mola_loop_speedup",
                    "flop_floor_vs_base",
                    "ms",
                    "tokens",
                    "other_load_cores",
                )
            }
            for name, r in results.items()
        },
        "targets": TARGETS,
        "met": met,
        "disturbed_cases": disturbed,
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
