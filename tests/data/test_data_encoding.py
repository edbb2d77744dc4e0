"""Prompt/target tokenization, BOS policy, truncation and the collator."""

from __future__ import annotations

import pytest
import torch

from molf.data import SFTCollator, encode_example, encode_prompt
from molf.data.encoding import IGNORE_INDEX


class CharTokenizer:
    """One id per character (ord + 10); adds BOS=1 by itself, like Llama's tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(char) + 10 for char in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_qwen_adds_no_bos_and_appends_eos(tokenizer):
    encoded = encode_example(tokenizer, "Answer:", " A", max_seq_length=None)
    prompt_ids = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(" A", add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
    assert encode_prompt(tokenizer, "Answer:") == prompt_ids


def test_bos_once_at_prompt_start_only():
    encoded = encode_example(CharTokenizer(), "ab", "c", max_seq_length=None)
    assert encoded["input_ids"] == [1, 107, 108, 109, 2]
    assert encoded["labels"] == [IGNORE_INDEX] * 3 + [109, 2]
    assert encode_prompt(CharTokenizer(), "ab") == [1, 107, 108]


def test_truncation_cuts_prompt_from_left_and_keeps_target_and_bos():
    encoded = encode_example(CharTokenizer(), "abcdef", "xy", max_seq_length=6)
    assert encoded["input_ids"] == [1, 111, 112, 130, 131, 2]  # BOS, "ef", "xy", EOS
    assert len(encoded["input_ids"]) == 6


def test_target_that_does_not_fit_drops_the_row():
    assert encode_example(CharTokenizer(), "abc", "xyz", max_seq_length=4) is None


def test_collator_pads_right_with_pad_id_and_ignore_index():
    collator = SFTCollator(CharTokenizer())
    batch = collator([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                      {"input_ids": [5], "attention_mask": [1], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_needs_a_pad_token():
    tokenizer = CharTokenizer()
    tokenizer.pad_token_id = None
    with pytest.raises(ValueError, match="pad token"):
        SFTCollator(tokenizer)
