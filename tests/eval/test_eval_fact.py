"""CounterFact scoring against a stub model with fixed bigram logits (hand-computed values)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molf.data.fact import FactExample
from molf.eval.fact import score_fact

VOCAB = ["<pad>", "<eos>", "is", "of", "English", "French", "Paris", "Rome", "X", "Y", "in"]
IDS = {word: index for index, word in enumerate(VOCAB)}


class WordTokenizer:
    """Whitespace tokenizer over VOCAB; no BOS (like Qwen2.5)."""

    bos_token_id, eos_token_id, pad_token_id = None, 1, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [IDS[word] for word in text.split()]}


class BigramStub(nn.Module):
    """logits[b, t] = TABLE[input_ids[b, t]]: the next-token distribution depends on the last token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def _table() -> torch.Tensor:
    table = torch.zeros(len(VOCAB), len(VOCAB))
    table[IDS["is"], IDS["English"]] = math.log(4.0)   # after "is": English 4x as likely as French
    table[IDS["of"], IDS["French"]] = math.log(2.0)    # after "of": French 2x as likely as English
    table[IDS["English"], IDS["Paris"]] = math.log(3.0)  # second tokens of two-token targets
    return table


def _example(prompt, new, true, rephrase=(), locality=(), locality_truth=None):
    return FactExample(prompt=prompt, target=" " + new, subject="X", target_new=new, target_true=true,
                       rephrase_prompts=tuple(rephrase), locality_prompts=tuple(locality),
                       locality_ground_truth=locality_truth)


def test_efficacy_margins_generalization_specificity_by_hand():
    row_is = torch.log_softmax(_table()[IDS["is"]], -1)
    row_of = torch.log_softmax(_table()[IDS["of"]], -1)
    row_english = torch.log_softmax(_table()[IDS["English"]], -1)
    row_french = torch.log_softmax(_table()[IDS["French"]], -1)
    examples = [
        # "X is" -> English (new) vs French (true): new wins by log 4 on both measures.
        _example("X is", "English", "French", rephrase=["Y of"], locality=["Y in"], locality_truth="French"),
        # "X of" -> English Paris (new) vs French Rome (true): first token loses (log 1 - log 2);
        # sequence: log P(English|of) + log P(Paris|English) vs log P(French|of) + log P(Rome|French).
        _example("X of", "English Paris", "French Rome", rephrase=["X is"]),
    ]
    metrics = score_fact(BigramStub(_table()), WordTokenizer(), examples, batch_size=3)
    first_2 = (row_of[IDS["English"]] - row_of[IDS["French"]]).item()
    seq_2 = (row_of[IDS["English"]] + row_english[IDS["Paris"]]
             - row_of[IDS["French"]] - row_french[IDS["Rome"]]).item()
    # P(English|of) = 1/12, P(French|of) = 2/12, P(Paris|English) = 3/13, P(Rome|French) = 1/11.
    assert first_2 == pytest.approx(-math.log(2.0), abs=1e-6)
    assert seq_2 == pytest.approx(math.log((1 / 12) * (3 / 13) / ((2 / 12) * (1 / 11))), abs=1e-6)
    assert metrics["efficacy_first_token"] == 50.0
    assert metrics["efficacy_sequence"] == 100.0
    assert metrics["margin_first_token"] == pytest.approx((math.log(4.0) + first_2) / 2, abs=1e-6)
    assert metrics["margin_sequence"] == pytest.approx((math.log(4.0) + seq_2) / 2, abs=1e-6)
    # Rephrase "Y of": English vs French -> French wins (0%); "X is" -> English Paris vs French Rome wins.
    assert metrics["generalization"] == 50.0
    # Locality "Y in": uniform row, French (truth) vs English (new) tie -> not kept.
    assert metrics["specificity"] == 0.0
    assert row_is[IDS["English"]] > row_is[IDS["French"]]


def test_specificity_counts_prompts_where_the_true_answer_still_wins():
    examples = [_example("X in", "English", "French", locality=["Y of", "Y is"], locality_truth="French")]
    metrics = score_fact(BigramStub(_table()), WordTokenizer(), examples, batch_size=8)
    # "Y of": French (truth) beats English (new); "Y is": English (new) wins -> 1 of 2 kept.
    assert metrics["specificity"] == 50.0
    assert math.isnan(metrics["generalization"])


def test_batch_size_does_not_change_scores():
    examples = [_example("X is", "English", "French", rephrase=["Y of"]),
                _example("X of", "English Paris", "French Rome")]
    one = score_fact(BigramStub(_table()), WordTokenizer(), examples, batch_size=1)
    many = score_fact(BigramStub(_table()), WordTokenizer(), examples, batch_size=16)
    assert one == pytest.approx(many, nan_ok=True)


def test_rewrite_prompts_are_cut_as_training_cut_them(tokenizer, monkeypatch):
    # Training cuts a rewrite prompt to what max_seq_length leaves beside " " + target_new + EOS;
    # scoring must see that same prompt, not one cut to max_seq_length alone.
    import molf.eval.fact as fact_eval
    from molf.data.encoding import IGNORE_INDEX, encode_example

    example = FactExample(prompt="The mother tongue of Danielle Darrieux is", target=" English",
                          subject="Danielle Darrieux", target_new="English", target_true="French",
                          rephrase_prompts=(), locality_prompts=(), locality_ground_truth=None)
    seen = []

    def capture(model, pairs, batch_size, pad_id):
        seen.extend(prompt for prompt, _ in pairs)
        return torch.zeros(len(pairs)), torch.zeros(len(pairs))

    monkeypatch.setattr(fact_eval, "target_logprobs", capture)
    score_fact(nn.Identity(), tokenizer, [example], batch_size=2, max_length=8)
    trained = encode_example(tokenizer, example.prompt, example.target, max_seq_length=8)
    trained_prompt = [i for i, label in zip(trained["input_ids"], trained["labels"]) if label == IGNORE_INDEX]
    assert trained["prompt_tokens_cut"] > 0  # the limit does cut this prompt
    assert seen == [trained_prompt, trained_prompt]  # target_new and target_true pairs
