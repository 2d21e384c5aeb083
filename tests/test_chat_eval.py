import sys

import pytest
import torch

from nanochat.tokenizer import RustBPETokenizer
from scripts.chat_eval import categorical_correct, random_baseline, evaluate_task
from tasks.common import mc_conversation


class LetterModel(torch.nn.Module):
    """Puts the highest logit on one fixed token at every position."""

    def __init__(self, token, vocab_size):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx):
        logits = torch.zeros(idx.size(0), idx.size(1), self.vocab_size)
        logits[..., self.token] = 5.0
        return logits


def tokenizer():
    return RustBPETokenizer.train_from_iterator(iter(["A B C D which is the answer? " * 50]), 300)


def test_categorical_picks_the_letter_with_the_highest_logit_among_the_choices():
    tok = tokenizer()
    conv = mc_conversation("Which?", ["red", "green", "blue", "pink"], gold_index=2)
    c_id, a_id = tok.encode("C")[0], tok.encode("A")[0]
    assert categorical_correct(LetterModel(c_id, tok.get_vocab_size()), tok, conv)
    assert not categorical_correct(LetterModel(a_id, tok.get_vocab_size()), tok, conv)
    # "D" is not a choice of a 3-choice question: its high logit is ignored, A/B/C tie, A (first) wins
    d_model = LetterModel(tok.encode("D")[0], tok.get_vocab_size())
    assert categorical_correct(d_model, tok, mc_conversation("Which?", ["red", "green", "blue"], gold_index=0))
    assert not categorical_correct(d_model, tok, mc_conversation("Which?", ["red", "green", "blue"], gold_index=1))


class ListTask(list):
    eval_type = "categorical"


def test_accuracy_and_random_baseline():
    tok = tokenizer()
    task = ListTask([mc_conversation("Q", ["a", "b", "c", "d"], gold_index=i % 4) for i in range(8)])
    model = LetterModel(tok.encode("B")[0], tok.get_vocab_size())
    assert evaluate_task(model, tok, None, task, -1, None) == 0.25  # gold is B for 2 of 8
    assert evaluate_task(model, tok, None, task, 4, None) == 0.25   # --max-problems 4: golds A, B, C, D
    assert random_baseline("Quiz", task) == 0.25
    # upstream centers ARC and MMLU on a fixed 0.25, whatever a sample's choice counts (ARC has 3- and 5-choice questions)
    three = ListTask([mc_conversation("Q", ["a", "b", "c"], gold_index=0)] * 4)
    assert random_baseline("Quiz", three) == pytest.approx(1 / 3)
    assert random_baseline("ARC-Challenge", three) == random_baseline("MMLU", three) == 0.25


@pytest.mark.parametrize("flags, needle", [(["-x", "0"], "--max-problems"), (["-x", "-2"], "--max-problems"),
                                           (["-n", "0"], "--num-samples"), (["-m", "0"], "--max-new-tokens"),
                                           (["-t", "5"], "temperature"), (["-a", ","], "--tasks names no task")])
def test_bad_flags_stop_before_anything_is_evaluated_or_written(monkeypatch, capsys, flags, needle):
    """-x 0 used to score nothing and overwrite the results JSON with 0%; -n -1 and -t 5 ended in tracebacks."""
    from scripts import chat_eval
    monkeypatch.setattr(sys, "argv", ["chat_eval", "-a", "Arithmetic"] + flags)
    monkeypatch.setattr(chat_eval, "compute_init", lambda *a: pytest.fail("ran past the flag checks"))
    with pytest.raises(SystemExit) as e:
        chat_eval.main()
    assert e.value.code == 2 and needle in capsys.readouterr().err
