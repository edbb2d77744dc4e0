"""CounterFact evaluation by scoring, not generation: one batched forward per prompt set.

For a prompt p and targets o (tokenized as " " + o, no EOS, same BOS policy as training):

- first-token log-prob: log P(first token of o | p) (paper parity);
- sequence log-prob: sum over the target tokens of log P(token | p, previous target tokens).

Metrics over the rewrites (efficacies, generalization and specificity in %):

- efficacy_first_token / efficacy_sequence: share of rewrite prompts with
  logP(target_new) > logP(target_true);
- margin_first_token / margin_sequence: mean of logP(target_new) - logP(target_true) (nats);
- generalization: share of paraphrase (rephrase) prompts with sequence logP(target_new) >
  logP(target_true) (Meng et al.'s paraphrase score);
- specificity: share of neighborhood (locality) prompts whose correct answer still wins,
  sequence logP(locality_ground_truth) > logP(target_new) (Meng et al.'s neighborhood score; in the
  original layout the neighborhood answer is target_true).

Meng et al. compare length-normalised (mean) log-probs; sequence scores here are sums, as DESIGN asks.
Under ``max_seq_length`` every prompt is cut from the left to what training leaves beside
" " + target_new + EOS, so the rewrite prompts are scored exactly as they were trained.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from molf.data.encoding import encode_prompt, encode_target, prompt_budget
from molf.data.fact import FactExample

Pair = tuple[list[int], list[int]]  # (prompt ids, target ids)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def target_logprobs(model, pairs: Sequence[Pair], batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-token and summed log-probs of each target after its prompt, shape (N,) each, fp32 on CPU."""
    first, total = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="scoring", unit="batch", leave=False):
        chunk = pairs[start:start + batch_size]
        longest = max(len(p) + len(t) for p, t in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full_like(input_ids, -100)  # (B, T): target ids where they sit, -100 elsewhere
        for row, (prompt, target) in enumerate(chunk):
            input_ids[row, :len(prompt) + len(target)] = torch.tensor(prompt + target)
            labels[row, len(prompt):len(prompt) + len(target)] = torch.tensor(target)
        attention_mask = (labels != -100) | (torch.arange(longest) < torch.tensor([len(p) for p, _ in chunk])[:, None])
        device = _device(model)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device)).logits
        logits = logits[:, :-1].float().cpu()  # (B, T-1, V): position j predicts token j+1
        next_tokens = labels[:, 1:]  # (B, T-1)
        is_target = next_tokens != -100
        picked = logits.gather(-1, next_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        token_logprobs = (picked - logits.logsumexp(-1)) * is_target  # (B, T-1)
        total.append(token_logprobs.sum(-1))
        first_positions = torch.tensor([len(p) - 1 for p, _ in chunk])  # (B,)
        first.append(token_logprobs[torch.arange(len(chunk)), first_positions])
    return torch.cat(first), torch.cat(total)


def _encode_pairs(tokenizer, prompts: Sequence[list[int]], targets: Sequence[str]) -> list[Pair]:
    return [(prompt, tokenizer(" " + target, add_special_tokens=False)["input_ids"])
            for prompt, target in zip(prompts, targets, strict=True)]


def _cut_prompts(tokenizer, prompts: Sequence[str], new_targets: Sequence[str], max_length) -> list[list[int]]:
    """Prompt ids, each cut to what ``max_length`` leaves beside " " + target_new + EOS: the cut training
    made to the rewrite prompts, so the evaluation scores the prompts the model was trained on."""
    return [encode_prompt(tokenizer, prompt, None if max_length is None
                          else max(prompt_budget(max_length, encode_target(tokenizer, " " + new)), 1))
            for prompt, new in zip(prompts, new_targets, strict=True)]


def _compare(model, tokenizer, prompts, winners, losers, new_targets, batch_size,
             max_length) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: (first-token, sequence) log-prob differences winner - loser, one forward pass set."""
    if not prompts:
        return torch.empty(0), torch.empty(0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cut = _cut_prompts(tokenizer, prompts, new_targets, max_length)
    pairs = _encode_pairs(tokenizer, cut, winners) + _encode_pairs(tokenizer, cut, losers)
    first, total = target_logprobs(model, pairs, batch_size, pad_id)
    n = len(prompts)
    return first[:n] - first[n:], total[:n] - total[n:]


def _share_positive(diffs: torch.Tensor) -> float:
    return 100.0 * (diffs > 0).float().mean().item() if diffs.numel() else math.nan


def score_fact(model, tokenizer, examples: Sequence[FactExample], batch_size: int, max_length=None) -> dict[str, float]:
    """The six CounterFact metrics (see the module docstring) for ``examples``."""
    was_training = model.training
    model.eval()
    new = [e.target_new for e in examples]
    first, sequence = _compare(model, tokenizer, [e.prompt for e in examples], new,
                               [e.target_true for e in examples], new, batch_size, max_length)
    rephrase = [(p, e) for e in examples for p in e.rephrase_prompts]
    new = [e.target_new for _, e in rephrase]
    _, rephrase_seq = _compare(model, tokenizer, [p for p, _ in rephrase], new,
                               [e.target_true for _, e in rephrase], new, batch_size, max_length)
    locality = [(p, e) for e in examples for p in e.locality_prompts]
    new = [e.target_new for _, e in locality]
    _, locality_seq = _compare(model, tokenizer, [p for p, _ in locality],
                               [e.locality_ground_truth for _, e in locality], new, new, batch_size, max_length)
    model.train(was_training)
    return {
        "efficacy_first_token": _share_positive(first),
        "efficacy_sequence": _share_positive(sequence),
        "margin_first_token": first.mean().item() if first.numel() else math.nan,
        "margin_sequence": sequence.mean().item() if sequence.numel() else math.nan,
        "generalization": _share_positive(rephrase_seq),
        "specificity": _share_positive(locality_seq),
    }
