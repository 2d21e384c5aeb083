import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from scripts.chat_rl import policy_loss


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def logp_of(model, seq, positions):
    logits = model(torch.tensor([seq[:-1]]))[0].log_softmax(-1)
    return sum(logits[p - 1, seq[p]].item() for p in positions)


def test_positive_advantage_raises_and_negative_lowers_logprob():
    good, bad = [1, 5, 7, 9, 11], [1, 5, 8, 10, 12]
    masks = [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    model = tiny_model()
    before = logp_of(model, good, [2, 3, 4]), logp_of(model, bad, [2, 3, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss = policy_loss(model, [good, bad], masks, [1.0, -1.0], pad_id=0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = logp_of(model, good, [2, 3, 4]), logp_of(model, bad, [2, 3, 4])
    assert after[0] > before[0] and after[1] < before[1]


def test_masked_tokens_get_no_gradient_and_padding_is_ignored():
    model = tiny_model()
    seq = [1, 5, 7, 9]
    # only token 7 (position 2) is a policy choice; 9 was forced by the tool
    loss = policy_loss(model, [seq, [1, 5]], [[0, 0, 1, 0], [0, 1]], [1.0, 0.0], pad_id=0)
    loss.backward()
    grad_only_7 = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(torch.tensor([seq[:-1]]))[0].log_softmax(-1)
    (-logits[1, 7] / 2).backward()  # the loss averages over both rows' policy tokens (2)
    assert torch.allclose(grad_only_7, model.lm_head.weight.grad, atol=1e-6)
    model.zero_grad()
    zero = policy_loss(model, [seq], [[0, 0, 1, 1]], [0.0], pad_id=0)
    assert zero.item() == 0.0


@pytest.mark.parametrize("temperature", ["3", "0.001", "0"])
def test_a_temperature_the_sampler_refuses_stops_at_the_command_line(monkeypatch, capsys, temperature):
    """-t 3 or 0.001 passed the old check (> 0), then the first rollout raised a traceback after the model had
    loaded (and, with --overwrite, after the previous RL checkpoints were removed)."""
    from scripts import chat_rl
    monkeypatch.setattr(sys, "argv", ["chat_rl", "--temperature", temperature])
    monkeypatch.setattr(chat_rl, "compute_init", lambda *a: pytest.fail("ran past the flag checks"))
    with pytest.raises(SystemExit) as e:
        chat_rl.main()
    assert e.value.code == 2 and "temperature" in capsys.readouterr().err
