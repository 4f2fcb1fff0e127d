"""Frozen-feature protocols: a linear probe, a k-nearest-neighbour classifier and the
bag-of-codes floor. They answer "did pretraining learn anything the task needs?" in seconds,
without the optimisation questions of fine-tuning, so a fine-tuned row can be read against
them (issue 14; DESIGN.md "Experiments").

- `linear_probe`: BatchNorm without affine parameters, then a linear layer, on frozen features
  (MAE's linear probing, He et al. 2022, Sec. A.2). With the whole training set as one batch the
  BatchNorm is a standardisation by the training features' mean and variance, which is what
  makes a feature that varies little between videos (a fresh backbone's [CLS]) usable at all. The
  linear layer is a multinomial logistic regression with an L2 penalty, fitted to convergence
  with L-BFGS: deterministic, no learning rate or epoch count to tune per dataset.
- `knn`: weighted k-nearest neighbours on cosine similarity (k = 20, votes weighted by
  exp(similarity / 0.07)), as DINO (Caron et al. 2021) and InstDisc evaluate features.
- `bag_of_codes`: the same linear probe on each video's normalised histogram of VQ-VAE codes:
  no model, no positions, no order. Whatever a row cannot beat, the tokens alone already give.

Only numpy and torch; the callers (stages/finetune/probe.py) read tokens and run backbones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

KNN_K = 20
KNN_TEMPERATURE = 0.07
# L2 penalty of the probe's logistic regression, per training video (sum of squared weights on
# standardised features). Small: the probe should show what is linearly there, not a prior.
PROBE_L2 = 1e-3
BN_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6) before the probe's linear layer


@dataclass
class LinearProbe:
    """Standardisation (the non-affine BatchNorm's statistics) and the fitted linear layer."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    train_accuracy: float

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) / self.std
        logits = z @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _check(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) with one label each, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("no training features")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got {y.min()}..{y.max()}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    return x, y


def fit_linear_probe(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = PROBE_L2, max_iter: int = 500) -> LinearProbe:
    """Non-affine BatchNorm + linear layer on (N, D) features, fitted by L-BFGS (full batch)."""
    x, y = _check(x, y, n_classes)
    mean = x.mean(axis=0)
    std = np.sqrt(x.var(axis=0) + BN_EPS)
    z = torch.from_numpy((x - mean) / std)  # (N, D) float64: the probe is tiny, precision is free
    target = torch.from_numpy(y)
    weight = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, target) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = float(((z @ weight.T + bias).argmax(1) == target).double().mean())
    return LinearProbe(mean, std, weight.detach().numpy(), bias.detach().numpy(), train_acc)


def knn_proba(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, *, k: int = KNN_K,
              temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """(M, C) class scores of weighted cosine kNN: the k most similar training videos vote with
    weight exp(cos / T); scores are normalised to sum to 1 per video."""
    train_x, train_y = _check(train_x, train_y, n_classes)
    test = F.normalize(torch.from_numpy(np.asarray(test_x, np.float64)), dim=1)  # (M, D)
    train = F.normalize(torch.from_numpy(train_x), dim=1)  # (N, D)
    sims = test @ train.T  # (M, N)
    k = min(k, train.shape[0])
    top, idx = sims.topk(k, dim=1)  # (M, k)
    weights = (top / temperature).exp()
    votes = torch.zeros(test.shape[0], n_classes, dtype=torch.float64)
    votes.scatter_add_(1, torch.from_numpy(train_y)[idx], weights)
    return (votes / votes.sum(dim=1, keepdim=True)).float().numpy()


def code_histogram(tokens: np.ndarray, codebook_size: int, pad_id: int | None = None) -> np.ndarray:
    """The normalised histogram (codebook_size,) of a video's codes (any shape; pad ids ignored)."""
    flat = np.asarray(tokens).reshape(-1).astype(np.int64)
    if pad_id is not None:
        flat = flat[flat != pad_id]
    flat = flat[(flat >= 0) & (flat < codebook_size)]
    counts = np.bincount(flat, minlength=codebook_size).astype(np.float64)
    return counts / max(1.0, counts.sum())
