import random

import pytest
import torch

from nanochat.megacontext.probes import answer_spans, digit_probe, fact_block, raw_blocks
from nanochat.megacontext.working_context import Entry, WorkingContext


def test_fact_block_finds_the_value_stated_earliest_and_none_when_absent():
    history = [9] * 100
    history[70:72] = [1, 2]
    history[90:92] = [1, 2]
    assert fact_block(history, [1, 2, 3]) == 2  # " <value>." minus its '.': found first in tokens 70..71, block 2
    assert fact_block(torch.tensor(history), torch.tensor([1, 2, 3])) == 2
    history[63:65] = [1, 2]  # straddling blocks 1 and 2: the block of its last token
    assert fact_block(history, [1, 2, 3]) == 2
    assert fact_block(history, [4, 5, 3]) is None


def test_raw_blocks_and_answer_spans():
    wc = WorkingContext([Entry(1, 0, 32), Entry(0, 32, 64), Entry(1, 64, 96), Entry(0, 96, 100)])
    assert raw_blocks(wc) == {1, 3}
    assert answer_spans(torch.tensor([0, 1, 1, 0, 0, 1, 1, 1])) == [(1, 3), (5, 8)]
    assert answer_spans(torch.zeros(4)) == []


def test_digit_probe_reads_digits_a_linear_map_can_and_not_from_noise():
    rng = random.Random(0)
    values = ["".join(str(rng.randint(0, 9)) for _ in range(3)) for _ in range(400)]
    onehot = torch.stack([torch.cat([torch.nn.functional.one_hot(torch.tensor(int(c)), 10).float() for c in v]) for v in values])
    mixed = onehot @ torch.randn(30, 64) + 0.01 * torch.randn(400, 64)  # (400, 64): a linear code of the digits
    assert min(digit_probe(mixed, values)) > 0.95
    noise = torch.randn(400, 64)
    assert max(digit_probe(noise, values)) < 0.25  # chance is 0.1
    with pytest.raises(ValueError):
        digit_probe(noise[:3], values[:3])
