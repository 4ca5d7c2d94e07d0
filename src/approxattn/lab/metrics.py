"""Error metrics of an approximate attention against exact softmax attention.

Matrices are ``(..., Nq, Nk)`` attention matrices (rows = queries); outputs are any shape.
Every function reduces over all leading dimensions unless it says "per matrix".
"""

from __future__ import annotations

import torch

import approxattn


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F over the whole tensor (0 when both are 0)."""
    if approx.shape != exact.shape:
        raise ValueError(f"approx: expected shape {tuple(exact.shape)} like exact, got {tuple(approx.shape)}")
    diff = (approx.double() - exact.double()).norm()
    ref = exact.double().norm()
    if ref == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / ref)


def relative_error_per_head(approx: torch.Tensor, exact: torch.Tensor) -> list[float]:
    """Relative Frobenius error of each ``(batch, head)`` slice of ``(B, H, N, dv)`` outputs."""
    diff = (approx.double() - exact.double()).flatten(2).norm(dim=-1)
    ref = exact.double().flatten(2).norm(dim=-1).clamp_min(1e-300)
    return (diff / ref).flatten().tolist()


def spectral_norm(matrices: torch.Tensor, *, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """‖M‖₂ of each matrix in ``(..., m, n)`` by power iteration on MᵀM (float64), shape ``(...)``."""
    m = matrices.double()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*m.shape[:-2], m.shape[-1], 1, generator=gen, dtype=torch.float64).to(m.device)
    x = x / x.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    for _ in range(iterations):
        y = m.transpose(-1, -2) @ (m @ x)
        x = y / y.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    return (m @ x).norm(dim=(-2, -1))


def matrix_errors(approx: torch.Tensor, exact: torch.Tensor, *, iterations: int = 50) -> dict[str, float]:
    """Relative Frobenius and spectral errors of attention matrices, each the mean over matrices."""
    if approx.shape != exact.shape:
        raise ValueError(f"approx: expected shape {tuple(exact.shape)} like exact, got {tuple(approx.shape)}")
    diff = approx.double() - exact.double()
    fro = diff.norm(dim=(-2, -1)) / exact.double().norm(dim=(-2, -1)).clamp_min(1e-300)
    spec = spectral_norm(diff, iterations=iterations) / spectral_norm(exact, iterations=iterations).clamp_min(1e-300)
    return {"mat_fro_err": float(fro.mean()), "mat_spec_err": float(spec.mean())}


def row_kl(exact: torch.Tensor, approx: torch.Tensor, *, eps: float = 1e-12) -> float:
    """Mean over rows of KL(exact_row ‖ approx_row).

    Approximate rows need not be distributions (kernel methods can give tiny or negative
    entries): they are clipped to ``eps`` and renormalised first. Entries where the exact row
    is 0 (masked keys) contribute 0; rows that are entirely 0 are skipped.
    """
    p = exact.double()
    q = approx.double().clamp_min(eps)
    q = q / q.sum(dim=-1, keepdim=True)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros((), dtype=p.dtype))
    per_row = terms.sum(dim=-1)
    valid = p.sum(dim=-1) > 0
    return float(per_row[valid].mean()) if valid.any() else 0.0


def topk_recall(exact: torch.Tensor, approx: torch.Tensor, k: int) -> float:
    """The share of each row's k largest exact entries that the method keeps, averaged over rows.

    "Kept" entries of a row are its k largest approximate entries, among those that are
    non-zero (a sparse method keeps only its support). Rows with fewer than k non-zero exact
    entries (causal rows near the start) use as many as they have.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    n = exact.shape[-1]
    k = min(k, n)
    top_exact = exact.topk(k, dim=-1)
    target = top_exact.values > 0
    approx_values = approx.double()
    top_approx = approx_values.abs().topk(k, dim=-1)
    kept = torch.zeros(approx.shape, dtype=torch.bool, device=approx.device)
    kept.scatter_(-1, top_approx.indices, top_approx.values > 0)
    hit = kept.gather(-1, top_exact.indices) & target
    counts = target.sum(dim=-1)
    valid = counts > 0
    return float((hit.sum(dim=-1)[valid].double() / counts[valid].double()).mean()) if valid.any() else 0.0


def mass_kept(exact: torch.Tensor, approx: torch.Tensor, *, tol: float = 0.0) -> float:
    """Mean over rows of the exact attention mass on the entries the method keeps (|approx| > tol).

    1.0 for any dense method; below 1 for sparse methods that drop keys.
    """
    kept = approx.abs() > tol
    mass = (exact.double() * kept).sum(dim=-1)
    valid = exact.sum(dim=-1) > 0
    return float(mass[valid].mean()) if valid.any() else 0.0


def attention_matrix(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, causal: bool = False,
    scale: float | None = None, **options
) -> torch.Tensor:
    """A method's ``(B, Hq, Nq, Nk)`` attention matrix for these inputs (``output = A @ v``),
    through the public API (:func:`approxattn.attention_matrices`). v matters for methods whose
    weights depend on it (SEA); for the others it is the identity trick. Keep Nk small. The tensors
    are positional-only: a method option may be called ``k`` (SEA's budget)."""
    return attention_maps(method, q, k, v, causal=causal, scale=scale, **options)["attention"]


def attention_maps(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, causal: bool = False,
    scale: float | None = None, **options
) -> dict[str, torch.Tensor]:
    """Every dense view a method offers (``"attention"`` and, e.g. for SEA, ``"sparse"`` and
    ``"estimated"``), each ``(B, Hq, Nq, Nk)``."""
    return approxattn.attention_matrices(q, k, v, method, causal=causal, scale=scale, **options)


def exact_matrix(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale) in float64 with the causal mask, GQA handled: the reference matrix."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        n = logits.shape[-1]
        mask = torch.ones(logits.shape[-2], n, dtype=torch.bool, device=q.device).tril(n - logits.shape[-2])
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)
