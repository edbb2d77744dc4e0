"""Batched greedy generation from already-encoded prompts (left padding, stop at EOS)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                    desc: str = "generating") -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in input order."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        input_ids, attention_mask = left_pad(prompts[start:start + batch_size], pad_id, model.device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=pad_id)  # (B, T + new)
        new_tokens = generated[:, input_ids.shape[1]:]  # (B, new)
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return outputs
