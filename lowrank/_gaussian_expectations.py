"""Expectations of an activation under (bivariate) Gaussian pre-activations.

The layer objective E(σ(z1) - σ(z2))² for jointly Gaussian pre-activations
z1 = μ1 + s1·ξ1 and z2 = μ2 + t2·(ρ·ξ1 + sqrt(1-ρ²)·ξ2), with ξ1, ξ2 independent N(0, 1).
`t2` is a signed scale: std(z2) = |t2| and corr(z1, z2) = sign(t2)·ρ.

ReLU gets exact closed forms (the arc-cosine kernel when both means vanish; with means,
Price's theorem reduces the cross moment to a smooth one-dimensional integral).
Every other elementwise activation uses tensor-product Gauss–Hermite quadrature, which
is exact for polynomials of degree < 2·nodes (the identity included) and converges
exponentially fast for smooth activations (GELU, SiLU, tanh).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

GAUSS_HERMITE_NODES = 24
_LEGENDRE_NODES = 32


def gauss_hermite(num: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights with Σ w·f(x) ≈ E f(ξ), ξ ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(num)
    return nodes, weights / weights.sum()


def arccos_kernel(corr: Float[ArrayLike, "*s"]) -> Float[Array, "*s"]:
    """κ(ρ) with E[relu(a·x) relu(b·x)] = ‖a‖‖b‖κ(cos∠(a, b)) for x ~ N(0, I)."""
    corr = _safe_corr(corr)
    return (jnp.sqrt(1.0 - corr**2) + (jnp.pi - jnp.arccos(corr)) * corr) / (2 * jnp.pi)


def _standardized(mean, std):
    """μ/s clipped to ±40 (where Φ and φ have reached their limits); s = 0 gives ±40 or 0."""
    positive = std > 0
    h = jnp.where(positive, mean / jnp.where(positive, std, 1.0), jnp.sign(mean) * 40.0)
    return jnp.clip(h, -40.0, 40.0)


def _safe_corr(corr):
    """Correlations kept one ulp off ±1, where sqrt(1-ρ²) and arccos have infinite slope."""
    margin = jnp.finfo(jnp.result_type(corr, float)).eps
    return jnp.clip(corr, -1.0 + margin, 1.0 - margin)


def relu_mean(mean, std):
    """E relu(z), z ~ N(μ, s²)."""
    h = _standardized(mean, std)
    return mean * jax.scipy.stats.norm.cdf(h) + std * jax.scipy.stats.norm.pdf(h)


def relu_second_moment(mean, std):
    """E relu(z)², z ~ N(μ, s²)."""
    h = _standardized(mean, std)
    cdf, pdf = jax.scipy.stats.norm.cdf(h), jax.scipy.stats.norm.pdf(h)
    return (mean**2 + std**2) * cdf + mean * std * pdf


def relu_cross_moment(mean1, std1, mean2, std2, corr):
    """E[relu(z1) relu(z2)] for std1, std2 >= 0 and correlation `corr`.

    Price's theorem: d/dcov E[relu(z1)relu(z2)] = P(z1 > 0, z2 > 0) = Φ2(h, k; r), and
    dΦ2/dr = φ2(h, k; r), so the moment is E relu(z1)·E relu(z2) +
    s1·s2·(ρ·Φ(h)Φ(k) + ∫_0^ρ (ρ - t) φ2(h, k; t) dt). The substitution t = sin θ removes
    φ2's endpoint singularity, leaving a smooth integrand for Gauss–Legendre.
    """
    corr = _safe_corr(corr)
    h, k = _standardized(mean1, std1), _standardized(mean2, std2)
    x, w = np.polynomial.legendre.leggauss(_LEGENDRE_NODES)
    upper = jnp.arcsin(corr)[..., None]
    theta = upper * (x + 1) / 2
    sin, cos2 = jnp.sin(theta), jnp.cos(theta) ** 2
    h_, k_ = h[..., None], k[..., None]
    exponent = -(h_**2 - 2 * h_ * k_ * sin + k_**2) / (2 * cos2)
    integrand = (corr[..., None] - sin) * jnp.exp(exponent) / (2 * jnp.pi)
    integral = jnp.sum(integrand * w, axis=-1) * upper[..., 0] / 2
    cdf = jax.scipy.stats.norm.cdf
    return relu_mean(mean1, std1) * relu_mean(mean2, std2) + std1 * std2 * (
        corr * cdf(h) * cdf(k) + integral
    )


def relu_centred_sq_diff(std1, scale2, corr):
    """expected_sq_diff for ReLU with both means 0: s1²/2 + t2²/2 - 2·s1·|t2|·κ(±ρ)."""
    signed = jnp.where(scale2 < 0, -corr, corr)
    return std1**2 / 2 + scale2**2 / 2 - 2 * std1 * jnp.abs(scale2) * arccos_kernel(signed)


def expected_square(
    activation: Callable[[Array], Array],
    mean: Float[ArrayLike, "*s"],
    std: Float[ArrayLike, "*s"],
    nodes: int = GAUSS_HERMITE_NODES,
) -> Float[Array, "*s"]:
    """E σ(μ + s·ξ)², ξ ~ N(0, 1)."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    if activation is jax.nn.relu:
        return relu_second_moment(mean, std)
    x, w = gauss_hermite(nodes)
    values = activation(mean[..., None] + std[..., None] * x)
    return jnp.sum(w * values**2, axis=-1)


def expected_sq_diff(
    activation: Callable[[Array], Array],
    mean1: Float[ArrayLike, "*s"],
    std1: Float[ArrayLike, "*s"],
    mean2: Float[ArrayLike, "*s"],
    scale2: Float[ArrayLike, "*s"],
    corr: Float[ArrayLike, "*s"],
    nodes: int = GAUSS_HERMITE_NODES,
) -> Float[Array, "*s"]:
    """E(σ(z1) - σ(z2))² for z1 = μ1 + s1·ξ1, z2 = μ2 + t2·(ρ·ξ1 + sqrt(1-ρ²)·ξ2)."""
    mean1, std1, mean2, scale2, corr = map(jnp.asarray, (mean1, std1, mean2, scale2, corr))
    corr = _safe_corr(corr)
    if activation is jax.nn.relu:
        std2 = jnp.abs(scale2)
        signed = jnp.where(scale2 < 0, -corr, corr)
        cross = relu_cross_moment(mean1, std1, mean2, std2, signed)
        diff = relu_second_moment(mean1, std1) + relu_second_moment(mean2, std2) - 2 * cross
        return jnp.maximum(diff, 0.0)
    x, w = gauss_hermite(nodes)
    x1, x2 = x[:, None], x[None, :]
    w2 = w[:, None] * w[None, :]
    e = lambda a: a[..., None, None]
    z1 = e(mean1) + e(std1) * x1
    z2 = e(mean2) + e(scale2) * (e(corr) * x1 + e(jnp.sqrt(1.0 - corr**2)) * x2)
    return jnp.sum(w2 * (activation(z1) - activation(z2)) ** 2, axis=(-2, -1))
