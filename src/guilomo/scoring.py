"""Log-likelihood scoring of (context, continuation) pairs, as lm-evaluation-harness scores
them, with each context computed once for all its continuations: one pass over a batch of
left-padded contexts returns their KV cache and the first continuation token's logits; the
continuations then run against that cache, so a long passage (SciQ, BoolQ) costs one pass, not
one per option. Padding and positions are explicit: the result equals one forward over each
pair alone, to float tolerance."""

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
    """(context tokens, continuation tokens), split as lm-evaluation-harness splits them:
    trailing spaces of the context move to the continuation, and the continuation is the
    whole text's tokens past the context's token count."""
    if not context:
        raise ValueError("an empty context leaves nothing to condition the continuation on")
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
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


def pad_batch(
    seqs: Sequence[Sequence[int]], pad: int, *, left: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded with `pad` to the longest, left or right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _forward_names(model: torch.nn.Module) -> tuple[str | None, str]:
    """The names `model.forward` gives its "logits of the last positions only" argument (None
    if it has none) and its KV cache (transformers 5.24 renamed `past_key_values` to `cache`)."""
    params = inspect.signature(model.forward).parameters
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
    """The summed log-probability of each pair's continuation given its context; `batch_size`
    counts contexts per pass. The model is used as it is (call `.eval()` first)."""
    run = _Scoring(model, pairs, pad)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    # Longest first (memory peaks early), by context plus its longest continuation: both
    # passes pad to their batch's longest, and continuations can be the longer (PIQA).
    longest = {c: max(len(pairs[i][1]) for i in members) for c, members in groups.items()}
    contexts = sorted(groups, key=lambda c: (-(len(c) + longest[c]), c))
    with tqdm(total=len(pairs), desc="score", disable=not progress) as bar:
        for start in range(0, len(contexts), batch_size):
            batch = contexts[start : start + batch_size]
            members = [groups[c] for c in batch]
            run.batch(batch, members)
            bar.update(sum(len(m) for m in members))
    return run.scores


class _Scoring:
    """One `loglikelihoods` call: what both passes of a batch share; `scores` fills in place."""

    def __init__(self, model: torch.nn.Module, pairs: Sequence[Pair], pad: int) -> None:
        self.model, self.pairs, self.pad = model, pairs, pad
        self.scores, self.device = [0.0] * len(pairs), model_device(model)
        # the forward's "logits of the last positions only" argument, and its cache's name
        self.keep, self.cache_name = _forward_names(model)

    def batch(self, contexts: Sequence[tuple[int, ...]], members: Sequence[list[int]]) -> None:
        pairs, device = self.pairs, self.device
        # 1. The contexts, left-padded so every last token sits in the last column.
        ids, mask = pad_batch(contexts, self.pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        keep: dict[str, Any] = {self.keep: 1} if self.keep else {}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G, V): continuation token 0
        rows = [(g, i) for g, m in enumerate(members) for i in m]
        for g, i in rows:
            self.scores[i] = float(first[g, pairs[i][1][0]])

        # 2. Every continuation longer than one token, against its context's cache: it reads
        # its tokens but the last, which predict its tokens from the second on. Longest first,
        # in chunks of `len(contexts)` rows, so one long option does not pad all the others.
        longer = [(g, i) for g, i in rows if len(pairs[i][1]) > 1]
        longer.sort(key=lambda gi: -len(pairs[gi[1]][1]))
        chunks = [longer[k : k + len(contexts)] for k in range(0, len(longer), len(contexts))]
        cache = out[self.cache_name]
        for n, chunk in enumerate(chunks):
            # one copy of its context's keys and values per continuation (the last chunk may
            # reorder the cache itself)
            self.continuations(chunk, cache if n == len(chunks) - 1 else copy.deepcopy(cache), mask)

    def continuations(self, chunk: list[tuple[int, int]], cache: Any, mask: torch.Tensor) -> None:
        pairs, device = self.pairs, self.device
        counts = [len(pairs[i][1]) - 1 for _, i in chunk]  # tokens each continuation reads
        c_ids, c_mask = pad_batch([pairs[i][1][:-1] for _, i in chunk], self.pad, left=False)
        owner = torch.tensor([g for g, _ in chunk], device=device)
        cache.reorder_cache(owner)
        # after each context's own tokens (its mask's count)
        start = mask[owner].sum(-1, keepdim=True)  # (R, 1)
        positions = start + torch.arange(c_ids.shape[1], device=device)  # (R, W)
        c_mask = torch.cat([mask[owner], c_mask.to(device)], dim=1)
        logits = self.model(
            input_ids=c_ids.to(device),
            attention_mask=c_mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_name: cache},
        ).logits  # (R, W, V)
        # log p(target) = logit - logsumexp, on the real positions only (no (R, W, V) softmax)
        rows = torch.cat([logits[r, :n] for r, n in enumerate(counts)]).float()  # (K, V)
        target = torch.tensor([t for _, i in chunk for t in pairs[i][1][1:]], device=device)
        logp = rows.gather(1, target[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)  # (K,)
        for (_, i), part in zip(chunk, logp.split(counts), strict=True):
            self.scores[i] += float(part.sum())
