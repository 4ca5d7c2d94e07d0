"""Gaussian-kernel attention: exact kernelized attention, Skyformer and SOFT.

All three replace the softmax by the Gaussian kernel ``κ(q, k) = exp(−scale·‖q − k‖²/2)``;
with the default softmax temperature ``scale = 1/√d`` this is the papers'
``exp(−‖q − k‖²/(2√d))``, and ``exp(scale·qᵀk) = exp(scale‖q‖²/2)·κ(q, k)·exp(scale‖k‖²/2)``
(the softmax kernel is κ between two diagonal scalings). As published, the kernel matrix
``C = κ(Q, K)`` is used without row normalisation (``out = C V``); option
``normalization`` also offers ``"row"`` (``C V / C 1``) and ``"symmetric"``
(``D_Q^{-1/2} C D_K^{-1/2} V`` with row and column sums, SOFT++'s normalisation).

- ``kernelized``: C formed explicitly, quadratic on purpose — the reference that Skyformer
  and SOFT approximate (their exact limits).
- ``skyformer`` (Chen et al. 2021): Nyström on the PSD 2N×2N Gram matrix of the stacked
  points ``[Q; K]``, whose off-diagonal block is the non-PSD C; landmarks sampled from the
  queries and the keys; inverse ``(M + γI)⁻¹`` by a normalised matmul-only iteration.
- ``soft`` (Lu et al. 2021): Nyström with pooled (segment-mean) landmarks and SOFT's
  Newton–Raphson Moore–Penrose inverse.
"""

from __future__ import annotations

from typing import Any

import torch

from ..blocks.gaussian_kernel import (
    NORMALIZATIONS,
    factored_attention,
    gaussian_kernel,
    gaussian_log_kernel,
    masked_rows,
    segment_means,
)
from ..blocks.pseudo_inverse import skyformer_inverse, soft_newton_pinv
from ..module import AttentionModule, RandomFeatureModule
from ..registry import (
    Cost,
    ExactLimit,
    MethodSpec,
    Option,
    Shape,
    choice_option,
    float_option,
    int_option,
    redraw_option,
    register,
    seed_option,
)
from ..validation import AttentionShape, compute_dtype
from .nystrom import PINV_MODES, query_validity

SAMPLINGS = ("without-replacement", "with-replacement")
LANDMARK_SOURCES = ("queries", "queries+keys")


def normalization_option(default: str) -> Option:
    return choice_option(
        "normalization", default,
        "'none': out = C V (the papers); 'row': C V / C 1; 'symmetric': D_Q^-1/2 C D_K^-1/2 V with the row "
        "sums D_Q and column sums D_K (SOFT++; non-causal)",
        NORMALIZATIONS,
    )


def _check_causal_normalization(causal: bool, normalization: str, method: str) -> None:
    if causal and normalization == "symmetric":
        raise ValueError(
            f"option 'normalization' of method {method!r}: 'symmetric' divides by column sums over all "
            "queries, future ones included, so it cannot be causal; use 'none' or 'row' with causal=True"
        )


# ----------------------------------------------------------------------------- kernelized


class KernelizedAttention(AttentionModule):
    """Exact Gaussian-kernel attention (Skyformer's "kernelized attention"), quadratic on purpose.

    ``C = κ(Q, K)`` is formed explicitly ``(B, H, Nq, Nk)``; padded keys get weight 0.
    ``normalization='none'`` (the paper's code, the default): ``out = C V``;
    ``'row'``: ``softmax(−scale‖q − k‖²/2) V``; ``'symmetric'``: ``D_Q^{-1/2} C D_K^{-1/2} V``
    with ``D_Q = C 1`` and ``D_K = Cᵀ 1`` over valid keys and valid queries (in a
    self-attention-shaped call with a padding mask the padded query rows do not count).
    The normalised forms are computed in log space (no underflow). Causal: supported for
    'none' and 'row' (lower-triangular C).
    """

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        normalization = self.options["normalization"]
        _check_causal_normalization(causal, normalization, self.spec.name)
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), masked_rows(k.to(dtype), key_padding_mask), masked_rows(v.to(dtype), key_padding_mask)
        log_c = gaussian_log_kernel(q, k, scale=scale)
        allowed = torch.ones(1, 1, 1, shape.seq_k, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            allowed = key_padding_mask[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(shape.seq_q, shape.seq_k, dtype=torch.bool, device=q.device).tril()
        masked = log_c.masked_fill(~allowed, float("-inf"))
        if normalization == "none":
            return torch.exp(masked) @ v
        if normalization == "row":
            has_key = allowed.any(dim=-1, keepdim=True)
            weights = torch.softmax(masked.masked_fill(~has_key, 0.0), dim=-1)
            return torch.where(has_key, weights, torch.zeros((), dtype=dtype, device=q.device)) @ v
        row_log_degree = torch.logsumexp(masked, dim=-1, keepdim=True)
        q_valid = query_validity(key_padding_mask, shape)
        by_query = masked if q_valid is None else masked.masked_fill(~q_valid[:, None, :, None], float("-inf"))
        column_log_degree = torch.logsumexp(by_query, dim=-2, keepdim=True).masked_fill(~allowed, 0.0)
        return torch.exp(masked - 0.5 * row_log_degree - 0.5 * column_log_degree) @ v


def kernelized_cost(shape: Shape, options: dict) -> Cost:
    pairs = shape.batch * shape.heads * shape.seq_q * shape.seq_k * (0.5 if shape.causal else 1.0)
    return Cost(
        flops=2.0 * pairs * (shape.head_dim + shape.value_dim) + 4.0 * pairs,
        exps=float(pairs),
        bytes_moved=shape.io_bytes + 4.0 * 2 * pairs,
        peak_memory=4.0 * 2 * pairs,
    )


register(MethodSpec(
    name="kernelized",
    family="exact",
    summary="exact Gaussian-kernel attention exp(−‖q−k‖²/(2√d)) (Skyformer's target); QUADRATIC on purpose, "
            "the reference for skyformer and soft",
    reference="Chen et al., Skyformer: Remodel Self-Attention with Gaussian Kernel and Nyström Method, NeurIPS 2021",
    supports_causal=True,
    options=(normalization_option("none"),),
    exact_limit=ExactLimit(
        parent="kernelized",
        description="is exact Gaussian-kernel attention (not a softmax approximation: a different kernel)",
        options=lambda n: {},
    ),
    cost_formula=kernelized_cost,
    cost_doc="QUADRATIC: flops = 2·B·H·Nq·Nk·(d+dv) + 4·B·H·Nq·Nk (distances) (halved causal); "
             "exps = B·H·Nq·Nk; bytes = q,k,v,o + the fp32 Nq×Nk kernel written and read; peak = 2 Nq×Nk",
    module_class=KernelizedAttention,
))


# ----------------------------------------------------------------------------- landmarks


def sample_positions(
    valid: torch.Tensor | None,
    batch: int,
    length: int,
    count: int,
    generator: torch.Generator,
    *,
    replacement: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform landmark positions among the valid tokens of each batch row.

    valid ``(B, N)`` bool or None (all valid) → indices ``(B, count)`` long and slot
    validity ``(B, count)`` bool. Without replacement a row with fewer than ``count``
    valid tokens fills the remaining slots with (invalid) padded positions, flagged False.
    With replacement (Skyformer's code) every slot is a valid token. Random numbers come
    from ``generator`` (CPU, fp64), so the draw depends only on the seed and the sizes.
    """
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    n_valid = valid.sum(dim=-1, keepdim=True)
    if replacement:
        u = torch.rand(batch, count, generator=generator, dtype=torch.float64).to(device)
        rank = torch.minimum((u * n_valid).long(), n_valid - 1)
        valid_first = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
        return valid_first.gather(1, rank), torch.ones(batch, count, dtype=torch.bool, device=device)
    u = torch.rand(batch, length, generator=generator, dtype=torch.float64).to(device)
    order = torch.argsort(u.masked_fill(~valid, 2.0), dim=-1)[:, :count]
    slots = torch.arange(count, device=device)[None, :] < n_valid
    return order, slots


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x ``(B, H, N, d)``, index ``(B, c)`` → ``(B, H, c, d)`` (the same rows for every head)."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def landmark_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    landmarks: torch.Tensor,
    landmark_valid: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``κ(Q, L)`` ``(B, H, Nq, ℓ)``, ``κ(L, L)`` ``(B, H, ℓ, ℓ)`` and ``κ(K, L)`` ``(B, H, Nk, ℓ)``.

    Invalid landmark slots (``landmark_valid (B, ℓ)`` False) get zero columns in the two
    outer kernels and an identity row/column in the core, so they drop out of
    ``κ(Q, L) W κ(L, K)`` for any (pseudo-)inverse W. Rows of padded keys are zero.
    """
    slot = landmark_valid[:, None, None, :]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    left = torch.where(slot, gaussian_kernel(q, landmarks, scale=scale), zero)
    right = masked_rows(torch.where(slot, gaussian_kernel(k, landmarks, scale=scale), zero), key_padding_mask)
    core = gaussian_kernel(landmarks, landmarks, scale=scale)
    pair = slot & landmark_valid[:, None, :, None]
    eye = torch.eye(core.shape[-1], dtype=q.dtype, device=q.device)
    core = torch.where(pair, core, eye)
    return left, core, right


# ----------------------------------------------------------------------------- Skyformer


def skyformer_landmarks(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shape: AttentionShape,
    landmarks: int,
    generator: torch.Generator,
    *,
    replacement: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ landmark points from the stacked ``[Q; K]``: ``⌈ℓ/2⌉`` query rows and ``⌊ℓ/2⌋`` key rows.

    Each half is clamped to its sequence length and drawn among valid tokens only
    (see :func:`sample_positions`). Returns points ``(B, H, ℓ', d)`` and validity ``(B, ℓ')``.
    """
    n_query = min(landmarks - landmarks // 2, shape.seq_q)
    n_key = min(landmarks // 2, shape.seq_k)
    q_valid = query_validity(key_padding_mask, shape)
    q_index, q_slots = sample_positions(q_valid, shape.batch, shape.seq_q, n_query, generator,
                                        replacement=replacement, device=q.device)
    k_index, k_slots = sample_positions(key_padding_mask, shape.batch, shape.seq_k, n_key, generator,
                                        replacement=replacement, device=q.device)
    points = torch.cat([_gather_rows(q, q_index), _gather_rows(k, k_index)], dim=2)
    return points, torch.cat([q_slots, k_slots], dim=1)


def skyformer_factors(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shape: AttentionShape,
    *,
    scale: float,
    landmarks: int,
    gamma: float,
    pinv: str,
    iterations: int,
    generator: torch.Generator,
    replacement: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Skyformer's ``C̃ = κ(Q, L) · W · κ(L, K)`` as ``(left, W, right)`` (right is ``κ(K, L)``).

    L are ℓ points of ``[Q; K]``; W ≈ ``(κ(L, L) + γI)⁻¹`` (:func:`skyformer_inverse`;
    ``pinv='exact'`` is ``pinv(κ(L, L) + γI)``). This is the off-diagonal block of the Nyström
    approximation ``C̄ S (Sᵀ C̄ S)⁺ Sᵀ C̄`` of the PSD Gram matrix ``C̄ = κ([Q; K], [Q; K])``,
    and ``‖C − C̃‖₂ ≤ ‖C̄ − C̄~‖₂``. Landmark *selection* is index sampling (no gradient);
    gradients flow through the landmark values.
    """
    points, valid = skyformer_landmarks(q, k, key_padding_mask, shape, landmarks, generator, replacement=replacement)
    left, core, right = landmark_kernels(q, k, points, valid, key_padding_mask, scale=scale)
    inverse = skyformer_inverse(core, gamma=gamma, iterations=iterations, exact=pinv == "exact")
    return left, inverse, right


class SkyformerAttention(RandomFeatureModule):
    """Skyformer (Chen et al., NeurIPS 2021): Gaussian-kernel attention by Nyström on the symmetric augmentation.

    1. ``C = κ(Q, K)`` is not PSD (Q ≠ K), but it is the off-diagonal block of the 2N×2N
       PSD Gram matrix of the stacked points ``[Q; K]``;
    2. landmarks L: ``⌈ℓ/2⌉`` query rows and ``⌊ℓ/2⌋`` key rows drawn uniformly among valid
       tokens (``sampling``: without replacement by default; the paper's code samples with
       replacement), the same for all heads of a sequence;
    3. ``C̃ = κ(Q, L) (κ(L, L) + γI)⁻¹ κ(L, K)``, the inverse by ``D^{-1/2}``-normalisation and
       6 hyper-power iterations (``pinv='iterative'``, γ = 0.1), or ``pinv((κ(L,L) + γI))``
       (``pinv='exact'``);
    4. ``out = C̃ V`` evaluated right to left (``normalization`` as for ``kernelized``).

    Landmarks come from a generator seeded by ``(seed, draw)``. The paper redraws them on
    every call; here ``redraw`` decides (training mode only; default 'never', so a module
    is a deterministic function of its inputs; 'every_call' is the paper's behaviour).
    With ℓ = 2N (every point a landmark), ``pinv='exact'`` and γ = 0 it equals
    ``kernelized``. Non-causal: landmarks and the inverse mix the whole sequence.
    """

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        # the seed lives in the state_dict too, so a restored module draws the same landmarks
        self.register_buffer("landmark_seed", torch.tensor(options["seed"], dtype=torch.long))

    def generator(self, draw: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(int(self.landmark_seed) * 1_000_003 + draw)
        return gen

    def draw_features(self, generator: torch.Generator) -> None:
        """Nothing to store: landmark indices depend on the input sizes and are drawn per call
        from the generator of the current draw."""

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        options = self.options
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), masked_rows(k.to(dtype), key_padding_mask), masked_rows(v.to(dtype), key_padding_mask)
        left, inverse, right = skyformer_factors(
            q, k, key_padding_mask, shape, scale=scale, landmarks=options["landmarks"], gamma=options["gamma"],
            pinv=options["pinv"], iterations=options["pinv_iterations"],
            generator=self.generator(int(self.feature_draws)),
            replacement=options["sampling"] == "with-replacement",
        )
        return factored_attention(left, inverse, right, v, normalization=options["normalization"],
                                  query_valid=query_validity(key_padding_mask, shape))


def nystrom_kernel_cost(shape: Shape, landmarks: int, inverse_flops: float, landmark_flops: float) -> Cost:
    """Cost of ``κ(Q, L) W κ(L, K)ᵀ V`` with ℓ landmarks, given the per-head cost of W and of L."""
    b, h, nq, nk, d, dv = shape.batch, shape.heads, shape.seq_q, shape.seq_k, shape.head_dim, shape.value_dim
    ell = landmarks
    kernel_elems = (nq + nk + ell) * ell
    per_head = (
        landmark_flops
        + (2.0 * d + 4.0) * kernel_elems  # distances and exponent
        + inverse_flops
        + 2.0 * (nk * ell + ell * ell + nq * ell) * (dv + 1)  # κ(K,L)ᵀV, W·, κ(Q,L)· (+1: degrees)
    )
    return Cost(
        flops=b * h * per_head,
        exps=float(b * h * kernel_elems),
        bytes_moved=shape.io_bytes + 4.0 * 2 * b * h * (nq + nk) * ell,
        peak_memory=4.0 * b * h * (kernel_elems + 4 * ell * ell),
    )


def skyformer_cost(shape: Shape, options: dict) -> Cost:
    ell = min(options["landmarks"] - options["landmarks"] // 2, shape.seq_q) + min(options["landmarks"] // 2,
                                                                                   shape.seq_k)
    if options["pinv"] == "exact":
        inverse = 10.0 * ell**3  # eigendecomposition, rough constant
    else:
        inverse = options["pinv_iterations"] * 4 * 2.0 * ell**3 + 3.0 * ell**2
    return nystrom_kernel_cost(shape, ell, inverse, 0.0)


register(MethodSpec(
    name="skyformer",
    family="nystrom",
    summary="Gaussian-kernel attention approximated by Nyström on the PSD 2N×2N augmentation of the "
            "non-PSD kernel matrix, with ridge γ and a matmul-only iterative inverse",
    reference="Chen et al., Skyformer: Remodel Self-Attention with Gaussian Kernel and Nyström Method, NeurIPS 2021",
    supports_causal=False,
    options=(
        int_option("landmarks", 128, "number of landmarks ℓ (half sampled from the queries, half from the "
                   "keys; each half clamped to its sequence length, so ℓ >= 2N uses every point)"),
        float_option("gamma", 0.1, "ridge γ added to the landmark kernel before inverting"),
        choice_option("pinv", "iterative", "'iterative': D^-1/2 normalisation + hyper-power iterations "
                      "(the paper); 'exact': torch.linalg.pinv(κ(L,L) + γI)", PINV_MODES),
        int_option("pinv_iterations", 6, "iterations of the inverse (pinv='iterative')"),
        choice_option("sampling", "without-replacement", "uniform landmark sampling among valid tokens; the "
                      "paper's code samples with replacement", SAMPLINGS),
        normalization_option("none"),
        redraw_option("never"),
        seed_option(),
    ),
    exact_limit=ExactLimit(
        parent="kernelized",
        description="landmarks = 2N (all stacked points), pinv='exact', gamma=0: C̃ = [C̄ C̄⁺ C̄]_QK = C",
        options=lambda n: {"landmarks": 2 * n, "pinv": "exact", "gamma": 0.0},
    ),
    cost_formula=skyformer_cost,
    cost_doc="per head with ℓ landmarks: flops = (2d+4)·(Nq+Nk+ℓ)·ℓ (kernels) + iterations·8·ℓ³ (inverse) "
             "+ 2·(Nk·ℓ + ℓ² + Nq·ℓ)·(dv+1); exps = (Nq+Nk+ℓ)·ℓ; bytes = q,k,v,o + fp32 N×ℓ kernels "
             "written and read; peak = N×ℓ kernels + ℓ×ℓ iteration temporaries",
    module_class=SkyformerAttention,
    example_options=lambda n: {"landmarks": max(2, n // 2)},
))


# ----------------------------------------------------------------------------- SOFT


class SoftAttention(AttentionModule):
    """SOFT, softmax-free attention (Lu et al., NeurIPS 2021; normalisation from SOFT++, IJCV 2024).

    1. landmarks ("bottleneck tokens"): padding-aware segment means of the queries (SOFT
       pools the queries with a learned strided convolution; segment means are its
       training-free form). ``landmark_source='queries+keys'`` pools half from q, half
       from k, useful for cross-attention, where keys need not lie near the queries;
    2. ``C̃ = κ(Q, L) · P⁺ · κ(L, K)`` with ``P = κ(L, L) + γI``;
    3. ``P⁺`` by SOFT's Newton–Raphson iteration ``V ← 2V − V P V`` (20 steps), started
       from ``α P`` with ``α = 2/‖P‖∞²`` halved until ``‖I − P V₀‖₁ ≤ 1.01``
       (``pinv='iterative'``), or by ``torch.linalg.pinv`` (``pinv='exact'``);
    4. ``out = D_Q^{-1/2} C̃ D_K^{-1/2} V`` with the approximate degrees ``D_Q = C̃ 1``,
       ``D_K = C̃ᵀ 1`` (``normalization='symmetric'``, SOFT++'s symmetric normalisation,
       computed from the factors in linear time), or ``'none'`` (the NeurIPS version, with
       keys tied to queries) or ``'row'``.

    SOFT ties keys to queries (K = Q), so C is symmetric PSD; this implementation takes
    q and k separately and equals SOFT when k is q. With landmarks = N (every query its own
    landmark), ``pinv='exact'`` and γ = 0, ``C̃ = κ(Q,Q) κ(Q,Q)⁻¹ κ(Q,K) = C``: exactly
    ``kernelized``. The released SOFT-Norm code normalises the core inverse by the degrees
    of κ(L, L) instead; here the approximated attention matrix itself is normalised, so that
    the exact limit is kernelized attention with the same normalisation. SOFT's optional
    2-D depthwise convolution of V (image grids) is not included. Non-causal.
    """

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        options = self.options
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), masked_rows(k.to(dtype), key_padding_mask), masked_rows(v.to(dtype), key_padding_mask)
        q_valid = query_validity(key_padding_mask, shape)
        m = options["landmarks"]
        if options["landmark_source"] == "queries":
            points, valid = segment_means(q, q_valid, min(m, shape.seq_q))
        else:
            q_points, q_slots = segment_means(q, q_valid, min(m - m // 2, shape.seq_q))
            k_points, k_slots = segment_means(k, key_padding_mask, min(m // 2, shape.seq_k))
            points, valid = torch.cat([q_points, k_points], dim=2), torch.cat([q_slots, k_slots], dim=1)
        left, core, right = landmark_kernels(q, k, points, valid, key_padding_mask, scale=scale)
        core = core + options["gamma"] * torch.eye(core.shape[-1], dtype=dtype, device=q.device)
        if options["pinv"] == "exact":
            inverse = torch.linalg.pinv(core, hermitian=True)
        else:
            inverse = soft_newton_pinv(core, iterations=options["pinv_iterations"])
        return factored_attention(left, inverse, right, v, normalization=options["normalization"],
                                  query_valid=q_valid)


def soft_cost(shape: Shape, options: dict) -> Cost:
    m = options["landmarks"]
    if options["landmark_source"] == "queries":
        ell = min(m, shape.seq_q)
    else:
        ell = min(m - m // 2, shape.seq_q) + min(m // 2, shape.seq_k)
    if options["pinv"] == "exact":
        inverse = 10.0 * ell**3
    else:
        inverse = 11 * 2.0 * ell**3 + options["pinv_iterations"] * 2 * 2.0 * ell**3  # α search + Newton
    landmark_flops = float((shape.seq_q + shape.seq_k) * shape.head_dim)
    return nystrom_kernel_cost(shape, ell, inverse, landmark_flops)


register(MethodSpec(
    name="soft",
    family="nystrom",
    summary="softmax-free attention: Gaussian kernel, segment-mean bottleneck tokens, Newton–Raphson "
            "Moore–Penrose inverse, symmetric normalisation",
    reference="Lu et al., SOFT: Softmax-free Transformer with Linear Complexity, NeurIPS 2021; "
              "Softmax-free Linear Transformers, IJCV 2024",
    supports_causal=False,
    options=(
        int_option("landmarks", 64, "number of bottleneck tokens m (segment means; clamped to the sequence "
                   "length, m = N is exact with pinv='exact' and gamma=0)"),
        choice_option("landmark_source", "queries", "pool landmarks from the queries (SOFT) or half from the "
                      "queries and half from the keys", LANDMARK_SOURCES),
        float_option("gamma", 0.0, "ridge γ added to κ(L, L) before inverting (SOFT's CUDA inverse uses 0.01)"),
        choice_option("pinv", "iterative", "'iterative': Newton–Raphson with the α preconditioning; 'exact': "
                      "torch.linalg.pinv", PINV_MODES),
        int_option("pinv_iterations", 20, "Newton–Raphson iterations (pinv='iterative')"),
        normalization_option("symmetric"),
    ),
    exact_limit=ExactLimit(
        parent="kernelized",
        description="landmarks = N from the queries (each its own landmark), pinv='exact', gamma=0: "
                    "κ(Q,Q) κ(Q,Q)⁺ κ(Q,K) = C (kernelized with the same normalization)",
        options=lambda n: {"landmarks": n, "landmark_source": "queries", "pinv": "exact", "gamma": 0.0,
                           "normalization": "symmetric"},
    ),
    cost_formula=soft_cost,
    cost_doc="per head with ℓ landmarks: flops = (Nq+Nk)·d (pooling) + (2d+4)·(Nq+Nk+ℓ)·ℓ (kernels) "
             "+ 22·ℓ³ (α search) + iterations·4·ℓ³ (Newton) + 2·(Nk·ℓ + ℓ² + Nq·ℓ)·(dv+1); "
             "exps = (Nq+Nk+ℓ)·ℓ; bytes = q,k,v,o + fp32 N×ℓ kernels written and read; "
             "peak = N×ℓ kernels + ℓ×ℓ temporaries",
    module_class=SoftAttention,
    example_options=lambda n: {"landmarks": max(1, n // 4)},
))
