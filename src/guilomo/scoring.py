"""Log-likelihood scoring of (context, continuation) pairs, as lm-evaluation-harness scores
them, with each context computed once for all its continuations.

Tokenisation follows the harness exactly (:func:`encode_pair`): trailing spaces of the
context move to the continuation, the context and the whole text are tokenised with the
tokenizer's own special tokens, and the continuation is the whole text's tokens past the
context's token count; the model reads ``context tokens + continuation tokens``.

Speed (:func:`loglikelihoods`): the pairs are grouped by their context tokens (a question's
options share one), and contexts are batched by length (context plus longest option),
longest first. One pass over a batch of left-padded contexts returns their KV cache and
the logits of each context's last token (the first continuation token's prediction); then
the batch's continuations run against their contexts' cache, sorted by length and in
chunks as large as the batch, so one long option does not pad the others. A question with
four options and a long passage (SciQ, BoolQ) thus costs one passage, not four. Padding
and positions are explicit, so the result equals one forward over each pair alone, to
float tolerance.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Pair:
    """(context tokens, continuation tokens), split as lm-evaluation-harness splits them.

    Raises:
        ValueError: an empty context, or a continuation that adds no token.
    """
    if not context:
        raise ValueError("an empty context leaves nothing to condition the continuation on")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tokenizer, context)
    cont = encode(tokenizer, context + continuation)[len(ctx) :]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} adds no token to the context")
    return ctx, cont


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set one")
    return int(pad)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward_names(model: torch.nn.Module) -> tuple[str | None, str]:
    """The names `model.forward` gives its "logits of the last positions only" argument
    (None if it has none) and its KV cache (transformers 5.24 renamed `past_key_values`
    to `cache`)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return keep, "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    *,
    pad: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """The summed log-probability of each pair's continuation given its context.

    `batch_size` counts contexts per pass; their continuations (all options) go in one
    second pass. The model is used as it is (call `.eval()` first).
    """
    device = model_device(model)
    names = _forward_names(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    # Longest first (memory peaks early), by context plus its longest continuation: both
    # passes pad to their batch's longest, and continuations can be the longer (PIQA).
    longest = {c: max(len(pairs[i][1]) for i in members) for c, members in groups.items()}
    contexts = sorted(groups, key=lambda c: (-(len(c) + longest[c]), c))
    scores = [0.0] * len(pairs)
    batches = [contexts[i : i + batch_size] for i in range(0, len(contexts), batch_size)]
    bar = tqdm(total=len(pairs), desc="score", disable=not progress)
    for batch in batches:
        members = [groups[c] for c in batch]
        _score_batch(model, batch, members, pairs, scores, pad, device, names)
        bar.update(sum(len(m) for m in members))
    bar.close()
    return scores


def _score_batch(
    model: torch.nn.Module,
    contexts: Sequence[tuple[int, ...]],
    members: Sequence[list[int]],
    pairs: Sequence[Pair],
    scores: list[float],
    pad: int,
    device: torch.device,
    names: tuple[str | None, str],
) -> None:
    keep, cache_name = names
    # 1. The contexts, left-padded so every last token sits in the last column.
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for g, c in enumerate(contexts):
        ids[g, width - len(c) :] = torch.tensor(c)
        mask[g, width - len(c) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    kwargs: dict[str, Any] = {keep: 1} if keep else {}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G, V): continuation token 0
    rows = [(g, i) for g, m in enumerate(members) for i in m]
    for g, i in rows:
        scores[i] = float(first[g, pairs[i][1][0]])

    # 2. Every continuation longer than one token, against its context's cache: it reads its
    # tokens but the last, which predict its tokens from the second on. Longest first, in
    # chunks of `len(contexts)` rows, so one long option does not pad all the others.
    longer = sorted(
        ((g, i) for g, i in rows if len(pairs[i][1]) > 1), key=lambda gi: -len(pairs[gi[1]][1])
    )
    chunks = [longer[k : k + len(contexts)] for k in range(0, len(longer), len(contexts))]
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    cache = out[cache_name]
    for n, chunk in enumerate(chunks):
        # one copy of its context's keys and values per continuation (the last chunk may
        # reorder the cache itself)
        view = cache if n == len(chunks) - 1 else copy.deepcopy(cache)
        _score_continuations(
            model, chunk, pairs, scores, pad, device, cache_name, view, mask, lengths
        )


def _score_continuations(
    model: torch.nn.Module,
    chunk: Sequence[tuple[int, int]],
    pairs: Sequence[Pair],
    scores: list[float],
    pad: int,
    device: torch.device,
    cache_name: str,
    cache: Any,
    mask: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    counts = [len(pairs[i][1]) - 1 for _, i in chunk]  # tokens each continuation reads
    width = max(counts)
    c_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    c_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, (_, i) in enumerate(chunk):
        c_ids[r, : counts[r]] = torch.tensor(pairs[i][1][:-1])
        c_mask[r, : counts[r]] = 1
    owner = torch.tensor([g for g, _ in chunk], device=device)
    cache.reorder_cache(owner)
    positions = lengths[owner, None] + torch.arange(width, device=device)  # (R, W)
    logits = model(
        input_ids=c_ids.to(device),
        attention_mask=torch.cat([mask[owner], c_mask.to(device)], dim=1),
        position_ids=positions,
        use_cache=True,
        **{cache_name: cache},
    ).logits  # (R, W, V)
    # log p(target) = logit - logsumexp, on the real positions only (no (R, W, V) log-softmax)
    rows = torch.cat([logits[r, :n] for r, n in enumerate(counts)]).float()  # (K, V)
    target = torch.tensor([t for _, i in chunk for t in pairs[i][1][1:]], device=device)
    logp = rows.gather(1, target[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)  # (K,)
    for (_, i), part in zip(chunk, logp.split(counts), strict=True):
        scores[i] += float(part.sum())
