"""Helpers for the parity tests against PyTorch references (diffusers, transformers)."""

import torch


def perturbed(model):
    """The reference's random init with every parameter moved, so norms and biases carry weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
