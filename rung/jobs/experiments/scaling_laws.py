"""Scaling-law fits: Kaplan power laws, the Chinchilla form with bootstrap intervals, and Clark et al.'s routed-MoE
law; and the compute-optimal split of a FLOP budget. Pure functions of (N, D, E, L) arrays.

Fits work on log L. Chinchilla's form L = E + A/N^α + B/D^β is fitted as in Hoffmann et al. (approach 3): Huber
loss (δ = 1e-3) on log L with L-BFGS from a grid of initialisations, here all starts optimised at once as a batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rung.errors import RungError


@dataclass
class PowerLaw:
    """L(X) = (X_c / X)^alpha."""

    alpha: float
    scale: float  # X_c

    def predict(self, x):
        return (self.scale / np.asarray(x, dtype=float)) ** self.alpha


@dataclass
class Chinchilla:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict | None = None  # parameter -> [2.5%, 97.5%] from the bootstrap

    def predict(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising L subject to 6·N·D = flops."""
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (flops / 6) ** a, (flops / 6) ** b / g


@dataclass
class RoutedMoE:
    """log L = a·log N + b·log Ê + c·log N·log Ê + d, Ê the saturating expert count (Clark et al. 2022)."""

    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float

    @staticmethod
    def saturate(e, e_start, e_max):
        return 1.0 / (1.0 / (e - 1 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)

    def predict(self, n, e):
        log_n = np.log(np.asarray(n, dtype=float))
        log_e = np.log(self.saturate(np.asarray(e, dtype=float), self.e_start, self.e_max))
        return np.exp(self.a * log_n + self.b * log_e + self.c * log_n * log_e + self.d)


def _require(points: int, parameters: int, what: str) -> None:
    if points <= parameters:
        raise RungError(f"fitting {what} needs more than {parameters} points, got {points}")


def fit_power_law(x, loss) -> PowerLaw:
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    _require(len(x), 2, "a power law")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -slope
    return PowerLaw(alpha=float(alpha), scale=float(math.exp(intercept / alpha)) if alpha else float("inf"))


def _huber(residual: torch.Tensor, delta: float) -> torch.Tensor:
    small = residual.abs() <= delta
    return torch.where(small, 0.5 * residual**2, delta * (residual.abs() - 0.5 * delta))


def _chinchilla_objectives(theta: torch.Tensor, ln, ld, ll, delta: float) -> torch.Tensor:
    """Huber loss of log L for each row (a, b, e, α, β) of theta."""
    a, b, e, alpha, beta = theta.T.unsqueeze(-1)
    predicted = torch.logsumexp(torch.stack([a - alpha * ln, b - beta * ld, e.expand(-1, ln.numel())]), 0)
    return _huber(predicted - ll, delta).sum(-1)


def _lbfgs(theta: torch.Tensor, objectives, max_iter: int = 300) -> None:
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        total = objectives(theta).sum()
        total.backward()
        return total

    optimizer.step(closure)


def _chinchilla_fit(log_n, log_d, log_l, starts: np.ndarray, delta: float = 1e-3, refine: int = 4) -> np.ndarray:
    """Best (a, b, e, α, β): every start optimised at once (their objectives are independent), then the most
    promising few refined one by one, since a shared line search stops short for most of the batch."""
    ln, ld, ll = (torch.as_tensor(v, dtype=torch.float64) for v in (log_n, log_d, log_l))

    def objectives(theta):
        return _chinchilla_objectives(theta, ln, ld, ll, delta)

    batch = torch.tensor(starts, dtype=torch.float64, requires_grad=True)
    _lbfgs(batch, objectives, max_iter=100)
    with torch.no_grad():
        values = torch.nan_to_num(objectives(batch), nan=float("inf"))
    best, best_value = None, float("inf")
    for index in values.argsort()[:refine].tolist():
        theta = batch[index:index + 1].detach().clone().requires_grad_(True)
        _lbfgs(theta, objectives)
        value = float(objectives(theta).detach())
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach()[0].numpy(), value
    if best is None:
        raise RungError("the Chinchilla fit did not converge from any starting point")
    return best


def fit_chinchilla(n, d, loss, bootstrap: int = 50, seed: int = 0) -> Chinchilla:
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    _require(len(n), 5, "L = E + A/N^α + B/D^β")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = np.array(list(itertools.product([0, 5, 10, 15, 20, 25], [0, 5, 10, 15, 20, 25], [-1, -0.5, 0, 0.5, 1],
                                           [0, 0.5, 1, 1.5, 2], [0, 0.5, 1, 1.5, 2])), dtype=float)
    best = _chinchilla_fit(log_n, log_d, log_l, grid)
    params = _to_chinchilla(best)
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(n), len(n))
            samples.append(asdict(_to_chinchilla(_chinchilla_fit(log_n[pick], log_d[pick], log_l[pick],
                                                                   best[None, :]))))
        params.intervals = {k: [float(np.percentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
                            for k in ("E", "A", "B", "alpha", "beta")}
    return params


def _to_chinchilla(theta: np.ndarray) -> Chinchilla:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return Chinchilla(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def fit_routed_moe(n, e, loss) -> RoutedMoE:
    n, e, loss = (np.asarray(v, dtype=float) for v in (n, e, loss))
    _require(len(n), 6, "the routed-MoE law")
    log_n, log_l = torch.as_tensor(np.log(n)), torch.as_tensor(np.log(loss))
    experts = torch.as_tensor(e)
    best, best_value = None, float("inf")
    for start_e, max_e in itertools.product([1.5, 3.0, 6.0], [64.0, 300.0, 1000.0]):
        theta = torch.tensor([-0.1, -0.1, 0.0, float(log_l.mean()), math.log(start_e), math.log(max_e)],
                             dtype=torch.float64, requires_grad=True)

        def objective(theta=theta):
            a, b, c, d, log_start, log_max = theta
            e_start, e_max = 1 + torch.exp(log_start), torch.exp(log_max)  # E_start > 1 keeps Ê finite
            e_hat = 1 / (1 / (experts - 1 + 1 / (1 / e_start - 1 / e_max)) + 1 / e_max)
            log_e = torch.log(e_hat)
            return ((a * log_n + b * log_e + c * log_n * log_e + d - log_l) ** 2).sum()

        optimizer = torch.optim.LBFGS([theta], max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      line_search_fn="strong_wolfe")

        def closure(theta=theta, optimizer=optimizer, objective=objective):
            optimizer.zero_grad()
            value = objective()
            value.backward()
            return value

        optimizer.step(closure)
        value = float(objective().detach())
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach().numpy().copy(), value
    a, b, c, d, log_start, log_max = best
    return RoutedMoE(a=float(a), b=float(b), c=float(c), d=float(d), e_start=1 + math.exp(log_start),
                     e_max=math.exp(log_max))
