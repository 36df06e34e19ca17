"""Each loss against a value computed by hand."""

import pytest
import torch

from galip.model import losses


def test_hinge_terms():
    assert losses.hinge_real(torch.tensor([2.0, -0.5])).item() == pytest.approx(0.75)  # (0 + 1.5) / 2
    assert losses.hinge_fake(torch.tensor([-2.0, 0.5])).item() == pytest.approx(0.75)  # (0 + 1.5) / 2


def test_d_hinge_combines_real_fake_mismatched():
    # relu(1 - 0.5) + [relu(1 + 0) + relu(1 - 2)] / 2 = 0.5 + 0.5
    loss = losses.d_hinge(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([-2.0]))
    assert loss.item() == pytest.approx(1.0)


def test_mismatched_rolls_sentences_by_one():
    s = torch.arange(3.0).unsqueeze(1)
    assert losses.mismatched(s).squeeze(1).tolist() == [1.0, 2.0, 0.0]


def test_ma_gp_on_a_linear_critic():
    # logits = 3 * f0 + 4 * s: the gradient is (3, 0 | 4) for every sample, norm 5, so 2 * 5^6 = 31250.
    feats = torch.randn(4, 2, requires_grad=True)
    sent = torch.randn(4, 1, requires_grad=True)
    logits = 3 * feats[:, :1] + 4 * sent
    assert losses.ma_gp(logits, feats, sent, k=2.0, p=6.0).item() == pytest.approx(31250.0)
    # p and k are honoured: 0.5 * 5^2
    logits = 3 * feats[:, :1] + 4 * sent
    assert losses.ma_gp(logits, feats, sent, k=0.5, p=2.0).item() == pytest.approx(12.5)


def test_ma_gp_undoes_the_grad_scale():
    feats = torch.randn(2, 2, requires_grad=True)
    sent = torch.randn(2, 1, requires_grad=True)
    logits = 3 * feats[:, :1] + 4 * sent
    assert losses.ma_gp(logits, feats, sent, grad_scale=1024.0).item() == pytest.approx(31250.0)


def test_ma_gp_is_differentiable_for_the_critic():
    w = torch.tensor([3.0], requires_grad=True)
    feats = torch.randn(2, 1, requires_grad=True)
    sent = torch.zeros(2, 1, requires_grad=True)
    gp = losses.ma_gp(w * feats + 0 * sent, feats, sent, k=2.0, p=6.0)  # 2 * w^6
    gp.backward()
    assert w.grad.item() == pytest.approx(12 * 3.0**5)


def test_g_loss():
    # -mean(1, 3) - 4 * mean(cos = 1, cos = 0) = -2 - 2
    logits = torch.tensor([1.0, 3.0])
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    sent = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert losses.g_loss(logits, emb, sent, sim_w=4.0).item() == pytest.approx(-4.0)
