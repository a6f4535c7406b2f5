"""The peers' initializers, `PlainSVD`, `SVDLLM`, `ASVD` and `ScaledASVD`, and the
pieces the ASVD rank search reuses; the methods and their sources: bench/peers.py."""

import math

import jax.numpy as jnp
import numpy as np

import lowrank

_TINY = 1e-6  # SVD-LLM's shift / ridge and ASVD's epsilon, as in their code


def _needs_inputs(problem: lowrank.LayerProblem, name: str) -> np.ndarray:
    if problem.inputs is None:
        raise ValueError(
            f"peer {name} needs calibration inputs for {problem.path}; pass calibration= "
            "to lowrank.factorize (with sequential=False, as the paper fits the dense inputs)"
        )
    return np.asarray(problem.inputs, np.float32)


def _split_factors(U, S, Vt, rank: int, right: np.ndarray | None, dtype):
    """u = U_r √Σ_r, v = √Σ_r V_rᵀ (· right): 'UV' sigma fusion, as both papers."""
    root = np.sqrt(S[:rank])
    v = root[:, None] * Vt[:rank]
    if right is not None:
        v = v @ right
    return jnp.asarray(U[:, :rank] * root, dtype), jnp.asarray(v, dtype)


class PlainSVD:
    """Truncated SVD of the dense weight (Eckart-Young), bias kept; no data."""

    calibration = "never"

    def __call__(self, problem: lowrank.LayerProblem, *, key=None) -> lowrank.Factors:
        del key
        w = np.asarray(problem.weight, np.float64)
        U, S, Vt = np.linalg.svd(w, full_matrices=False)
        u, v = _split_factors(U, S, Vt, problem.rank, None, problem.weight.dtype)
        return lowrank.Factors(u, v, problem.bias)

    def __repr__(self):
        return "plain SVD"


def svdllm_whitening(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) with S Sᵀ = XᵀX, SVD-LLM's way: Cholesky of the Gram, shifted by
    (1e-6 - λ_min)·I when it is not positive definite; S⁻¹ by inversion, with 1e-6·I
    added to S when that fails.

    Args:
        gram: XᵀX summed over the calibration rows, (n, n).

    Returns:
        The lower-triangular S and its inverse, float64.
    """
    gram = np.asarray(gram, np.float64)
    try:
        scale = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        shift = 1e-6 - np.linalg.eigvalsh(gram)[0]
        scale = np.linalg.cholesky(gram + shift * np.eye(len(gram)))
    try:
        inverse = np.linalg.inv(scale)
    except np.linalg.LinAlgError:
        scale = scale + _TINY * np.eye(len(scale))
        inverse = np.linalg.inv(scale)
    return scale, inverse


class SVDLLM:
    """SVD-LLM (W): truncation-aware whitening S = Cholesky(XᵀX), W' = [W S]_r S⁻¹."""

    calibration = "required"

    def __call__(self, problem: lowrank.LayerProblem, *, key=None) -> lowrank.Factors:
        del key
        x = _needs_inputs(problem, "SVD-LLM")
        scale, inverse = svdllm_whitening(x.T @ x)
        w = np.asarray(problem.weight, np.float64)
        U, S, Vt = np.linalg.svd(w @ scale, full_matrices=False)
        u, v = _split_factors(U, S, Vt, problem.rank, inverse, problem.weight.dtype)
        return lowrank.Factors(u, v, problem.bias)

    def __repr__(self):
        return "SVD-LLM"


def asvd_scale(inputs, alpha: float) -> np.ndarray:
    """ASVD's "abs_mean" scaling of the input channels: mean|x|^α + 1e-6, float64.

    Args:
        inputs: calibration rows (N, n) in the layer's input space.
        alpha: the exponent (their default 0.5; 0 gives plain SVD).

    Returns:
        s, shape (n,).
    """
    mean = np.mean(np.abs(np.asarray(inputs, np.float32)), axis=0, dtype=np.float64)
    return mean**alpha + _TINY


def asvd_factors(problem: lowrank.LayerProblem, scale: np.ndarray) -> lowrank.Factors:
    """u, v with u @ v = [W diag(s)]_r diag(s)⁻¹, bias kept."""
    w = np.asarray(problem.weight, np.float64)
    U, S, Vt = np.linalg.svd(w * scale[None, :], full_matrices=False)
    u, v = _split_factors(U, S, Vt / scale[None, :], problem.rank, None, problem.weight.dtype)
    return lowrank.Factors(u, v, problem.bias)


class ASVD:
    """ASVD: activation-aware SVD, W' = [W diag(s)]_r diag(s)⁻¹ with s = mean|x|^α."""

    calibration = "required"

    def __init__(self, alpha: float = 0.5):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"ASVD alpha must be a finite number >= 0 (paper: 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def __call__(self, problem: lowrank.LayerProblem, *, key=None) -> lowrank.Factors:
        del key
        return asvd_factors(problem, asvd_scale(_needs_inputs(problem, "ASVD"), self.alpha))

    def __repr__(self):
        return f"ASVD(alpha={self.alpha:g})"


class ScaledASVD:
    """ASVD with the channel scales measured beforehand ({path: s}, `activation_scales`):
    no calibration run, for the many trial factorizations of the sensitivity search."""

    calibration = "never"

    def __init__(self, scales: dict[str, np.ndarray]):
        self.scales = scales

    def __call__(self, problem: lowrank.LayerProblem, *, key=None) -> lowrank.Factors:
        del key
        if problem.path not in self.scales:
            raise ValueError(
                f"no ASVD scale for {problem.path}; measure it with activation_scales(model, "
                "paths including it, calibration)"
            )
        return asvd_factors(problem, self.scales[problem.path])

    def __repr__(self):
        return "ASVD"
