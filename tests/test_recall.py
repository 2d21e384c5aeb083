import re
import random

import pytest
import torch

from nanochat.common import UserError
from nanochat.recall import recall_row, recall_loader, recall_eval_docs, recall_accuracy
from nanochat.tokenizer import get_tokenizer


def rows_of(loader, n):
    return [next(loader) for _ in range(n)]


def test_a_recall_row_asks_every_fact_and_marks_exactly_the_answers(base_dir):
    tok = get_tokenizer()
    rng = random.Random(3)
    filler_ids = tok.encode("the quick brown fox jumps over the lazy dog. " * 400)
    ids, answer = recall_row(rng, 1025, 4, tok.encode, tok.get_bos_token_id(), lambda n: filler_ids[:n])
    assert len(ids) == len(answer) == 1025 and ids[0] == tok.get_bos_token_id()
    text = tok.decode(ids)
    facts = dict(re.findall(r"The (\w+) key is (\d{5})\. Remember it\. \2 is the \1 key\.", text))
    assert len(facts) == 4
    # every question comes after all the facts, and its answer (the marked tokens right after it) is its fact's value
    asked = re.findall(r"What is the (\w+) key\? The \1 key is", text)
    assert sorted(asked) == sorted(facts)
    assert text.rindex("Remember it") < text.index("What is the")
    spans, start = [], None
    for j, a in enumerate(answer + [False]):
        if a and start is None:
            start = j
        if not a and start is not None:
            spans.append(tok.decode(ids[start:j]))
            start = None
    assert spans == [f" {facts[w]}." for w in asked]
    assert answer[-1]  # the row ends with the last answer


def test_short_rows_carry_fewer_facts_and_a_row_too_short_for_one_is_a_user_error(base_dir):
    tok = get_tokenizer()
    filler_ids = tok.encode("lorem ipsum dolor sit amet " * 100)
    ids, answer = recall_row(random.Random(0), 80, 4, tok.encode, tok.get_bos_token_id(), lambda n: filler_ids[:n])
    assert len(ids) == 80 and 1 <= tok.decode(ids).count("Remember it") < 4
    with pytest.raises(UserError, match="cannot hold one fact"):
        recall_row(random.Random(0), 12, 4, tok.encode, tok.get_bos_token_id(), lambda n: filler_ids[:n])
    # more facts than a row can hold starts from what fits: 100,000 never ended (there are ~4,900 key words)
    ids, _ = recall_row(random.Random(0), 1025, 100000, tok.encode, tok.get_bos_token_id(), lambda n: (filler_ids * 20)[:n])
    assert len(ids) == 1025 and 4 < tok.decode(ids).count("Remember it") <= 1024 // 32
    with pytest.raises(UserError, match="at least one document, got --recall-eval-docs 0"):
        recall_eval_docs(tok, 257, 0)


def test_loader_targets_are_the_next_tokens_on_the_answers_and_ignored_elsewhere(base_dir):
    tok = get_tokenizer()
    x, y, _ = next(recall_loader(tok, 2, 256, "train", 3))
    assert x.shape == y.shape == (2, 256)
    scored = y >= 0
    assert scored.any(dim=1).all() and scored.float().mean() < 0.2
    assert torch.equal(y[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]])  # the next token, where scored
    assert (x[:, 0] == tok.get_bos_token_id()).all()


def test_curriculum_short_rows_first_same_tokens_per_micro_batch(base_dir):
    tok = get_tokenizer()
    shapes = [x.shape for x, _, _ in rows_of(recall_loader(tok, 2, 512, "train", 2, short_len=128, short_batches=3), 5)]
    assert shapes == [(8, 128)] * 3 + [(2, 512)] * 2
    with pytest.raises(UserError, match="short rows"):
        next(recall_loader(tok, 2, 512, "train", 2, short_len=100, short_batches=3))


def test_loader_is_deterministic_and_resumes_exactly(base_dir):
    tok = get_tokenizer()
    make = lambda state=None: recall_loader(tok, 2, 256, "train", 2, short_len=128, short_batches=2, resume_state_dict=state)
    first = rows_of(make(), 5)
    again = rows_of(make(), 5)
    resumed = rows_of(make(first[2][2]), 2)  # the state after batch 3 -> batches 4 and 5
    for (x, y, _), (x2, y2, _) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y, _), (x2, y2, _) in zip(first[3:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[3][0], first[4][0])
    with pytest.raises(UserError, match="recall_batch"):
        next(make({"pq_idx": 0, "rg_idx": 0}))


def test_filler_row_groups_are_tokenized_once_while_they_fit_the_cache(base_dir, monkeypatch):
    # the recall testbed draws filler from random row groups: a corpus that fits the cache is read and
    # tokenized once per group (pystdlib's 72 groups outnumbered a 64-group cache: ~18% of a training core)
    import nanochat.recall as recall
    tok = get_tokenizer()
    reads = []
    read = recall.read_row_group
    monkeypatch.setattr(recall, "read_row_group", lambda path, i: reads.append((path, i)) or read(path, i))
    rows_of(recall_loader(tok, 8, 256, "train", 2), 10)  # 80 rows' filler from the 6 train row groups
    assert len(reads) == len(set(reads)) == 6
    monkeypatch.setattr(recall, "CACHE_TOKENS", 1)  # room for one group: a draw of another reads it again
    reads.clear()
    again = rows_of(recall_loader(tok, 8, 256, "train", 2), 10)
    assert len(reads) > 6
    monkeypatch.setattr(recall, "CACHE_TOKENS", 1 << 26)
    for (x, y, _), (x2, y2, _) in zip(again, rows_of(recall_loader(tok, 8, 256, "train", 2), 10)):
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the cache changes no row


def test_eval_docs_end_in_the_question_and_recall_accuracy_scores_the_answer(base_dir):
    tok = get_tokenizer()
    docs = recall_eval_docs(tok, 200, 3)
    assert len(docs) == 3 and docs == recall_eval_docs(tok, 200, 3)
    for rank, world in ((0, 8), (1, 2)):  # each rank scored its own draw of documents, another one per layout
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("nanochat.recall.get_dist_info", lambda: (True, rank, rank, world))
            assert recall_eval_docs(tok, 200, 3) == docs
    for history, answer in docs:
        assert len(history) + len(answer) == 200
        assert tok.decode(history).endswith(" key is")
        value = re.search(r"The \w+ key is (\d{5})", tok.decode(history)).group(1)
        assert tok.decode(answer) == f" {value}."

    class Oracle(torch.nn.Module):  # predicts token t + 1 wherever it reads t: right exactly where ids run on
        def __init__(self, table):
            super().__init__()
            self.table = table  # {(context tuple): next id}

        def forward(self, ids):
            seq = ids[0].tolist()
            logits = torch.zeros(1, len(seq), 512)
            for j in range(len(seq)):
                logits[0, j, self.table.get(tuple(seq[:j + 1]), 0)] = 1.0
            return logits

    history, answer = docs[0]
    table = {tuple(history + answer[:k]): answer[k] for k in range(len(answer))}
    assert recall_accuracy(Oracle(table), docs[:1]) == 1.0
    assert recall_accuracy(Oracle(table), docs[:1], window=50) == 0.0  # its keys are whole histories
    table[tuple(history + answer[:2])] = answer[2] + 1  # one answer token wrong: not recalled
    assert recall_accuracy(Oracle(table), docs[:1]) == 0.0


def test_back_puts_the_one_fact_that_many_tokens_before_the_answer(base_dir):
    tok = get_tokenizer()
    fact_start = tok.encode("\n\nThe")
    for history, answer in recall_eval_docs(tok, 400, 6, back=(250, 300)):
        starts = [i for i in range(len(history)) if history[i:i + len(fact_start)] == fact_start
                  and "key is" in tok.decode(history[i:i + 12]) and "Remember" in tok.decode(history[i:i + 40])]
        assert len(starts) == 1
        assert 250 <= len(history) - starts[0] <= 300
    with pytest.raises(UserError, match="one fact"):
        next(recall_loader(tok, 1, 400, "train", 2, back=(10, 20)))


def test_base_eval_recall_reports_full_and_truncation_per_band(base_dir):
    from nanochat.gpt import GPT, GPTConfig
    from scripts.base_eval import evaluate_recall, parse_bands
    tok = get_tokenizer()
    assert parse_bands("100-300, 800-1000") == [(100, 300), (800, 1000)]
    for bad in ("100", "300-100", "a-b", "0-5"):
        with pytest.raises(UserError, match="--recall-bands"):
            parse_bands(bad)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=400, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    out = evaluate_recall(model, tok, "cpu", [(100, 150), (250, 300)], 3, 64)
    assert set(out) == {"100-150", "250-300"} and all(set(v) == {"full", "truncation"} for v in out.values())
    assert all(0.0 <= a <= 1.0 for v in out.values() for a in v.values())
    with pytest.raises(UserError, match="reach past"):
        evaluate_recall(model, tok, "cpu", [(300, 390)], 3, 64)
