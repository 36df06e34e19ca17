"""GALIP losses as pure tensor -> scalar functions (hinge, MA-GP, generator objective)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_real(logits: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - logits)): a matching (image, sentence) pair should score >= 1."""
    return F.relu(1.0 - logits).mean()


def hinge_fake(logits: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 + logits)): fakes and mismatched pairs should score <= -1."""
    return F.relu(1.0 + logits).mean()


def mismatched(sent: torch.Tensor) -> torch.Tensor:
    """Sentences rolled by one within the batch: every real image gets another image's sentence."""
    return torch.roll(sent, shifts=-1, dims=0)


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor, mis_logits: torch.Tensor) -> torch.Tensor:
    """relu(1 - C(real, s)) + [relu(1 + C(fake, s)) + relu(1 + C(real, s_mis))] / 2."""
    return hinge_real(real_logits) + 0.5 * (hinge_fake(fake_logits) + hinge_fake(mis_logits))


def ma_gp(
    logits: torch.Tensor,
    feats: torch.Tensor,
    sent: torch.Tensor,
    k: float = 2.0,
    p: float = 6.0,
    grad_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Matching-aware gradient penalty: k * mean_i ||[d logits / d feats_i, d logits / d s_i]||_2 ^ p.

    ``feats`` and ``sent`` must be part of the graph that produced ``logits`` (requires_grad).
    With fp16 AMP, pass the GradScaler's scale (a tensor keeps the step free of host syncs): the gradients are taken of the scaled logits (so they
    do not underflow) and unscaled before the norm, as the reference does.
    """
    out = logits if grad_scale is None else logits * grad_scale
    g_feats, g_sent = torch.autograd.grad(
        outputs=out.sum(), inputs=(feats, sent), create_graph=True, retain_graph=True
    )
    if grad_scale is not None:
        g_feats, g_sent = g_feats / grad_scale, g_sent / grad_scale
    grad = torch.cat([g_feats.flatten(1), g_sent.flatten(1)], dim=1).to(logits.dtype)
    # sqrt(sum(g^2))^p as the reference writes it, in the logits' (the D loss's) precision: norm(2).pow(p)
    # rounds differently in fp32, and the sixth power magnifies that difference.
    return k * torch.sqrt(torch.sum(grad**2, dim=1)).pow(p).mean()


def g_loss(fake_logits: torch.Tensor, fake_emb: torch.Tensor, sent: torch.Tensor, sim_w: float = 4.0) -> torch.Tensor:
    """-mean C(D(fake), s) - sim_w * mean cos(CLIP image embedding of fake, s)."""
    return -fake_logits.mean() - sim_w * F.cosine_similarity(fake_emb, sent, dim=-1).mean()
