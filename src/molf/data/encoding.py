"""Prompt/target tokenization shared by training and evaluation, and the SFT batch collator.

Prompt and target are tokenized separately and concatenated, so the prompt tokens are exactly the
tokens the evaluator feeds to ``generate``. BOS policy: when the tokenizer adds a BOS token by
itself (Llama, Gemma), it is put once at the start of the prompt; Qwen2.5 adds none, so none is
added. The target is followed by EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

IGNORE_INDEX = -100


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer adds BOS to plain text by itself, else ``[]``."""
    if tokenizer.bos_token_id is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


def encode_prompt(tokenizer, prompt: str, max_length: Optional[int] = None) -> list[int]:
    """Token ids of ``prompt`` (BOS policy applied), cut from the left to ``max_length`` if given.

    Left truncation keeps the BOS token and the end of the prompt, which is what the model continues.
    """
    return _encode_prompt(tokenizer, prompt, max_length)[0]


def _encode_prompt(tokenizer, prompt: str, max_length: Optional[int]) -> tuple[list[int], int]:
    """``encode_prompt``'s ids and how many prompt tokens the cut removed."""
    bos = bos_prefix(tokenizer)
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cut = 0
    if max_length is not None and len(bos) + len(body) > max_length:
        keep = max(max_length - len(bos), 0)
        cut = len(body) - keep
        body = body[cut:]
    return bos + body, cut


def encode_target(tokenizer, target: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before training")
        ids = ids + [tokenizer.eos_token_id]
    return ids


def prompt_budget(max_seq_length: Optional[int], target_ids: list[int]) -> Optional[int]:
    """Tokens ``max_seq_length`` leaves for the prompt beside the whole target (None: no limit; below 1
    when the target alone does not fit). Training cuts its prompts to it, and so does an evaluation that
    must see the training prompt."""
    return None if max_seq_length is None else max_seq_length - len(target_ids)


def encode_example(tokenizer, prompt: str, target: str,
                   max_seq_length: Optional[int]) -> Optional[dict[str, list[int]]]:
    """Tokenize one (prompt, target) pair for SFT, or return None when the target alone does not fit.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt), and
        ``prompt_tokens_cut`` (an int: prompt tokens cut from the left to fit, 0 when none), or None
        when ``max_seq_length`` leaves no room for at least one prompt token next to the whole target.
    """
    target_ids = encode_target(tokenizer, target)
    budget = prompt_budget(max_seq_length, target_ids)
    if budget is not None and budget < 1:
        return None
    prompt_ids, cut = _encode_prompt(tokenizer, prompt, budget)
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "prompt_tokens_cut": cut,
    }


@dataclass
class SFTCollator:
    """Pad a list of tokenized examples on the right to the longest one in the batch.

    ``input_ids`` are padded with ``tokenizer.pad_token_id``, ``attention_mask`` with 0 and
    ``labels`` with -100.
    """

    tokenizer: Any

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token) first")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, pad_value in pad_values.items():
            rows = [list(feature[key]) + [pad_value] * (longest - len(feature[key])) for feature in features]
            batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
        return batch
