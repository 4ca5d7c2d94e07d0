"""Sparse attention with an estimated mask: SEA (Lee, Kim, Willette, Hwang; ICLR 2024).

A Performer estimates, in linear time, a *compressed* attention row of T columns per query; a
small encoder + decoder (MLP + CNN) refines it; a grouped top-k keeps about k keys per row; exact
softmax runs on those keys only. Gates mix the sparse context with an average context.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks.feature_maps import (
    favor_key_features,
    favor_log_features,
    favor_query_features,
    favor_ratio,
    relu_features,
    zero_padded,
)
from ..blocks.kernel_attention import causal_kernel_attention, noncausal_kernel_attention
from ..blocks.random_matrices import gaussian_orthogonal_matrix
from ..blocks.sea_estimator import (
    CausalDecoder,
    NonCausalDecoder,
    fit_width,
    layer_norm,
    learned_probe_rows,
    linear,
    probe_row_index,
    relative_position_probe,
)
from ..blocks.sea_mask import CAUSAL_GROUPINGS, GROUPINGS, best_cells_only, select_cells
from ..blocks.sparse_attention import (
    ColumnLayout,
    apply_row_mix,
    column_layout,
    column_mask_attention,
    column_mask_probabilities,
    column_of_rank,
    column_rank_range,
    key_columns,
    layout_derived,
    nonempty_columns,
)
from ..module import RandomFeatureModule
from ..registry import (
    Cost,
    ExactLimit,
    MethodSpec,
    Option,
    Shape,
    bool_option,
    choice_option,
    int_option,
    redraw_option,
    register,
    seed_option,
)
from ..validation import AttentionShape, check_inputs, compute_dtype

SOFTMAX_EPS = 1e-6     # FAVOR+ ε (softmax kernel, non-causal estimator)
RELU_EPS = 1e-3        # generalized-attention ε (ReLU kernel, causal estimator)
CHUNK_SIZE = 64        # causal prefix-sum chunk of the estimator


def default_num_features(head_dim: int) -> int:
    """``int(d·ln d / 8)`` (SEA's OPT script: ``performer_nb_factor`` = 8), at least 1."""
    return max(1, int(head_dim * math.log(max(head_dim, 1)) / 8))


@dataclass
class SEAResult:
    """Everything one SEA call computed; the dense views are quadratic (training/visualisation).

    output ``(B, H, Nq, dv)``; estimated_logits ``(B, H, Nq, T)`` (Ŝ, compressed); selected
    ``(B, H, Nq, T)`` bool; layout (the column map); gates ``(B, H, Nq, 2)`` = σ(g0), σ(g1)
    (all ones with ``gates=False``). The module's ``forward`` may skip the estimate's maps and the
    selection where nothing reads them (see ``SEAAttention._compute``); ``forward_with_details``
    always fills them.
    """

    output: torch.Tensor
    estimated_logits: torch.Tensor
    selected: torch.Tensor
    layout: ColumnLayout
    gates: torch.Tensor
    _q: torch.Tensor = field(repr=False)
    _k: torch.Tensor = field(repr=False)
    _scale: float = field(repr=False)
    # non-causal average-context weights per key (B, H, Nk); None: causal (running mean) or no gates
    _average_weights: torch.Tensor | None = field(default=None, repr=False)

    def _heads(self, x: torch.Tensor, head: int | None) -> torch.Tensor:
        heads = x.shape[1]
        if head is None:
            return x
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
            raise ValueError(f"head: expected None or an int in [0, {heads}), got {head!r}")
        return x[:, head:head + 1]

    def estimated_attention_logits(self, head: int | None = None) -> torch.Tensor:
        """Ŝ resized to the keys, ``(B, H|1, Nq, Nk)``: key j of row i reads column c(i, j)
        (nearest, by the column map); ineligible keys (padded, causal future) are −inf."""
        logits = self._heads(self.estimated_logits, head)
        columns = key_columns(self.layout)                           # (B, Nq, Nk)
        B, H, Nq, _ = logits.shape
        index = columns.clamp(min=0)[:, None].expand(B, H, Nq, columns.shape[-1])
        resized = logits.gather(-1, index)
        return resized.masked_fill((columns < 0)[:, None], float("-inf"))

    def estimated_attention(self, head: int | None = None) -> torch.Tensor:
        """Softmax over the keys of :meth:`estimated_attention_logits`; ineligible keys and rows
        with no key are 0. ``(B, H|1, Nq, Nk)``."""
        logits = self.estimated_attention_logits(head)
        eligible = torch.isfinite(logits)
        has_key = eligible.any(dim=-1, keepdim=True)
        # rows without a key would be NaN; softmax a zero row there and mask it
        probs = torch.softmax(torch.where(has_key, logits, torch.zeros_like(logits)), dim=-1,
                              dtype=compute_dtype(logits.dtype))
        return probs * eligible.to(probs.dtype)

    def sparse_probabilities(self, head: int | None = None) -> torch.Tensor:
        """The gated sparse attention probabilities σ(g0)·softmax-on-the-mask, ``(B, H|1, Nq, Nk)``;
        row i sums to σ(g0) (0 for a row with no key)."""
        probs = column_mask_probabilities(self._q, self._k, self.selected, self.layout, scale=self._scale, head=head)
        return probs * self._heads(self.gates, head)[..., 0:1].to(probs.dtype)

    def average_attention(self, head: int | None = None) -> torch.Tensor:
        """The average context's weights as a matrix ``(B, H|1, Nq, Nk)``: non-causal, the same
        key weights for every row; causal, 1/L_i over the valid keys ≤ i."""
        eligible = torch.isfinite(self.estimated_attention_logits(head))
        if self._average_weights is not None:
            weights = self._heads(self._average_weights, head)[:, :, None, :].to(self.gates.dtype)
            return weights * eligible.to(weights.dtype)
        counts = eligible.sum(dim=-1, keepdim=True).clamp(min=1)
        return eligible.to(self.gates.dtype) / counts.to(self.gates.dtype)

    def effective_attention(self, head: int | None = None) -> torch.Tensor:
        """The matrix A with ``output = A @ v`` for this call (the mask and gates depend on v, so
        only for the v it was computed with): ``σ(g1)·sparse_probabilities + (1 − σ(g1))·average``,
        or the sparse probabilities alone with ``gates=False``. ``(B, H|1, Nq, Nk)``."""
        sparse = self.sparse_probabilities(head)
        mix = self._heads(self.gates, head)[..., 1:2].to(sparse.dtype)
        return mix * sparse + (1 - mix) * self.average_attention(head).to(sparse.dtype)


@dataclass
class SEADecodingState:
    """What causal decoding keeps between tokens (see :meth:`SEAAttention.decode_step`).

    Running FAVOR sums of the ReLU-kernel estimator (``feature_values`` Σφ(k)[P, v]ᵀ
    ``(B, Hkv, m, 2d)``, ``feature_sum`` Σφ(k) ``(B, Hkv, m)``), the rows the causal convolutions
    still need (``conv_history``), the running sum of v, and the key/value cache (capacity doubles).
    """

    batch: int
    heads: int
    kv_heads: int
    value_dim: int
    dtype: torch.dtype            # dtype of the inputs (the cache)
    compute_dtype: torch.dtype
    feature_values: torch.Tensor
    feature_sum: torch.Tensor
    value_sum: torch.Tensor
    conv_history: list[torch.Tensor]
    keys: torch.Tensor
    values: torch.Tensor
    position: int = 0

    def append(self, k_t: torch.Tensor, v_t: torch.Tensor) -> None:
        if self.position == self.keys.shape[2]:
            grow = max(16, self.keys.shape[2])
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[3])], 2)
            self.values = torch.cat(
                [self.values, self.values.new_zeros(*self.values.shape[:2], grow, self.values.shape[3])], 2)
        self.keys[:, :, self.position] = k_t[:, :, 0]
        self.values[:, :, self.position] = v_t[:, :, 0]
        self.position += 1


class SEAAttention(RandomFeatureModule):
    """SEA: sparse attention on a mask estimated by a Performer + MLP/CNN decoder.

    Per call (q ``(B, H, Nq, d)``, k/v with Hkv heads):

    1. Positional probe P ``(B, Nk, d)``: non-causal, the d×d identity resampled at the key's
       relative position ``rank/(n_valid−1)`` (a soft one-hot over d bins); causal, a learned
       ``(max_positions, d)`` table read at the key's rank (nearest-stretched past max_positions).
       ``v_aug = [P, v]`` (v cut/zero-padded to d channels when dv ≠ d), zero at padded keys.
    2. Estimator ``c = FAVOR(q, k, v_aug)`` ``(B, H, Nq, 2d)`` in fp32 (fp64 for fp64 inputs):
       non-causal FAVOR+ softmax kernel with orthogonal features; causal, the ReLU kernel
       (generalized attention; no look-ahead stabiliser needed) by prefix sums. Its first d
       channels are a histogram of where row i's attention falls.
    3. Encoder ``e = GELU(LayerNorm(Linear_{3d→2d}([c, v_i])))`` (v_i: the value of the query's
       own token in self-attention; zeros in cross-attention, where there is none); decoder →
       logits Ŝ ``(B, H, Nq, T)`` (:class:`NonCausalDecoder` / :class:`CausalDecoder`).
       With ``decoder_residual`` (non-causal only) ``log(histogram resized to T)`` is added and the
       decoder's last conv starts at zero. ``A_M = softmax_T(Ŝ)``.
    4. Grouped top-k on A_M (:func:`select_cells`) → ``selected (B, H, Nq, T)``.
    5. Exact softmax on the selected columns' keys (``column_mask_attention``; Triton on CUDA).
       Gates ``[g0, g1] = Linear_{2d→2}(e)``: ``out = σ(g1)·σ(g0)·sparse + (1 − σ(g1))·a`` with
       a the average context: non-causal ``Σ_j w_j v_j`` where w is the column mean of A_M over
       valid query rows, read at each key's column and normalised to sum to 1 over the valid keys
       (SEA's code uses the same weights unnormalised, summing to ≈ n_valid/T); causal, the
       running mean of v over the valid keys ≤ i. ``gates=False``: ``out = sparse``.

    Everything is linear in N except the dense views of :class:`SEAResult`. The module owns the
    estimators of both modes (a model uses one); all of its parameters are new
    (:meth:`estimator_parameters`). Parameters are drawn from ``seed``; the random features are
    redrawn by the ``redraw`` policy.
    """

    native_gqa = True

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        d = head_dim
        self.num_features = options["num_features"] or default_num_features(d)
        self.register_buffer("projection", torch.empty(self.num_features, d))
        self.draw_features(self.generator(0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options["seed"])
            self.encoder = nn.Linear(3 * d, 2 * d)
            self.encoder_norm = nn.LayerNorm(2 * d)
            self.gate = nn.Linear(2 * d, 2) if options["gates"] else None
            self.decoder = NonCausalDecoder(d, options["columns"], options["num_heads"],
                                            zero_last=options["decoder_residual"])
            self.causal_decoder = CausalDecoder(d, options["columns"], options["num_heads"])
            self.causal_probe = nn.Parameter(torch.randn(options["max_positions"], d))

    def draw_features(self, generator: torch.Generator) -> None:
        self.projection.copy_(gaussian_orthogonal_matrix(self.num_features, self.head_dim, generator))

    def estimator_parameters(self) -> list[nn.Parameter]:
        """The parameters SEA adds to a host model: all of this module's parameters."""
        return list(self.parameters())

    # ------------------------------------------------------------------ options

    def grouping(self, causal: bool) -> str:
        grouping = self.options["grouping"]
        if grouping == "auto":
            return "causal_batch" if causal else "batch"
        if causal and grouping not in CAUSAL_GROUPINGS:
            raise ValueError(
                f"grouping: {grouping!r} shares one top-k budget across query rows, so later tokens would "
                f"change earlier rows' selections; with causal=True expected one of {CAUSAL_GROUPINGS} or 'auto'"
            )
        return grouping

    def _check_heads(self, heads: int) -> None:
        num_heads = self.options["num_heads"]
        if num_heads is not None and heads != num_heads:
            raise ValueError(
                f"q: expected {num_heads} heads (this 'sea' module was built with num_heads={num_heads}: its "
                f"decoder CNN has one channel group per head), got {heads}"
            )

    # ------------------------------------------------------------------ forward

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        return self._compute(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                             shape=shape, details=False).output

    def forward_with_details(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> SEAResult:
        """Like ``forward``, returning a :class:`SEAResult` (output identical to ``forward``)."""
        shape, scale_value = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if shape.head_dim != self.head_dim:
            raise ValueError(
                f"q: expected head_dim {self.head_dim} (this 'sea' module was built for it), got {shape.head_dim}"
            )
        self.before_call()
        result = self._compute(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale_value,
                               shape=shape)
        result.output = result.output.to(q.dtype)
        return result

    def attention_matrices(self, q, k, v, *, causal=False, key_padding_mask=None, scale=None) -> dict[str, torch.Tensor]:
        """SEA's dense views for this (q, k, v), ``(B, H, Nq, Nk)`` each: ``attention`` (the effective
        matrix, output = A @ v), ``sparse`` (gated sparse probabilities), ``estimated`` (the
        estimator's attention resized to the keys). Quadratic: for inspection at small N."""
        result = self.forward_with_details(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return {"attention": result.effective_attention(), "sparse": result.sparse_probabilities(),
                "estimated": result.estimated_attention()}

    def _compute(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape,
                 details: bool = True) -> SEAResult:
        """One SEA call. details=False (``forward``): where every row keeps its best cell alone on the
        fused path, the estimate's logits, probabilities and the selection are never written (the
        result's estimated_logits and selected are then None; only its output is read)."""
        self._check_heads(shape.heads)
        grouping = self.grouping(causal)
        d, T = self.head_dim, self.options["columns"]
        dtype = compute_dtype(q.dtype)
        layout = column_layout(shape.batch, shape.seq_q, shape.seq_k, T, causal=causal,
                               key_padding_mask=key_padding_mask, device=q.device)
        key_valid = None if key_padding_mask is None else key_padding_mask[:, None, :]      # (B, 1, Nk)
        n_valid = layout_derived(layout, ("n_valid",), lambda: layout.key_rank.amax(dim=1) + 1)   # (B,)

        # At inference with half inputs on the fused path, the estimate (context, encoder, decoder
        # maps, logits) is stored in the input dtype: the estimator's kernel already rounds its
        # output to it, every kernel and GEMM after it accumulates in fp32, and the maps are read
        # and written several times (fp32 copies doubled those bytes: the decoder took 8.6 ms of the
        # 17.5-ms module at N = 65,536 on an H100). The softmax over the compressed width, and all
        # that follows, is fp32. Under autograd (distillation), or with half_estimate=False, the
        # estimate stays fp32.
        half_estimate = self.options["half_estimate"] and _half_operands(q) and not torch.is_grad_enabled()
        estimate_dtype = q.dtype if half_estimate else dtype

        # 1. probe and augmented values (padded keys zero)
        stage = _stage("sea.probe")
        v_fit = zero_padded(fit_width(v.to(estimate_dtype), d), key_valid)               # (B, Hkv, Nk, d)
        if causal:
            table = self.causal_probe.to(dtype)
            row_index = layout_derived(layout, ("probe_rows", table.shape[0], dtype),
                                       lambda: probe_row_index(layout.key_rank, n_valid, table.shape[0], dtype))
            probe = learned_probe_rows(table, layout.key_rank, n_valid, row_index=row_index)
        else:
            probe = layout_derived(layout, ("relative_probe", d, dtype),
                                   lambda: relative_position_probe(layout.key_rank, n_valid, d, dtype))
        v_aug = self._augmented_values(probe.to(estimate_dtype), v_fit)

        # 2. estimator (Performer) and 3. encoder, decoder
        stage = _stage("sea.estimator", stage)
        context = self._estimator_attention(q, k, v_aug, causal=causal,
                                            key_padding_mask=key_padding_mask, scale=scale, shape=shape)
        if causal and key_padding_mask is not None:
            # rows before the first real key see nothing: 0, as the reference path gives (the fused
            # causal kernel returns 0/0 there)
            sees_a_key = (layout.row_length > 0)[:, None, :, None]
            context = torch.where(sees_a_key, context, torch.zeros((), dtype=context.dtype, device=q.device))
        own_value = v_fit if shape.seq_q == shape.seq_k else None     # cross-attention: no own token
        query_valid = key_padding_mask if (key_padding_mask is not None and shape.seq_q == shape.seq_k) else None
        # unpadded non-causal rows of at least T keys: every column holds keys (no candidate mask needed)
        every_column = not causal and key_padding_mask is None and shape.seq_k >= T
        candidates = None if every_column else nonempty_columns(layout)
        # long unpadded inputs: each row keeps its best cell (known on the host), so the sparse step can take
        # each row's column, and forward needs only the rows' argmax and the estimate's column means (the
        # head then writes neither logits nor probabilities)
        one_cell_rows = best_cells_only(k=self.options["k"], columns=T, grouping=grouping, candidates=candidates,
                                        query_valid=query_valid, host_row_length=layout.host_row_length)
        lean_head = one_cell_rows and not details and not causal and dtype == torch.float32
        lean = None
        stage = _stage("sea.decoder", stage)
        # half inputs: the estimator's fp32 GEMMs may round their operands to TF32 (the estimate only
        # ranks cells, and its input already passed through bf16 dots); measured on an H100 the
        # decoder's fp32 FFMA GEMMs took ~6.5 ms of the 28 ms module at N = 65,536
        with _tf32_matmuls(q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
            fused = self._fused_encoder(context, own_value) if half_estimate else None
            e, fused_gates = fused if fused is not None else (self._encode(context, own_value, shape.groups), None)
            if causal:
                logits, best = self.causal_decoder(e), None
                probs = torch.softmax(logits, dim=-1, dtype=dtype)
            else:
                histogram = context[..., :d] if self.options["decoder_residual"] else None
                if lean_head:
                    lean = self.decoder.best_and_column_sums(e, histogram=histogram, n_valid=n_valid)
                if lean is None:
                    logits, probs, best = self.decoder.logits_and_probs(e, histogram=histogram, n_valid=n_valid,
                                                                        probs_dtype=dtype)

        # 4. grouped top-k
        stage = _stage("sea.select", stage)
        if lean is not None:
            logits = probs = selected = None
            row_column, column_sums = lean
            column_mean = column_sums / shape.seq_q                                      # (B, H, T)
        else:
            selected = select_cells(probs, candidates, layout.row_length, k=self.options["k"],
                                    grouping=grouping, query_valid=query_valid,
                                    host_row_length=layout.host_row_length, row_best=best)
            row_column = best if one_cell_rows else None

        # 5. gates and average context, then the sparse exact attention mixed with them per row
        stage = _stage("sea.gates", stage)
        average_weights = mix = None
        if self.gate is None:
            gates = torch.ones(*q.shape[:3], 2, dtype=dtype, device=q.device)
        else:
            gates = fused_gates if fused_gates is not None else torch.sigmoid(linear(e, self.gate))
            if causal:
                average = self._causal_average(v.to(dtype), layout, key_valid, shape)      # (B, H, Nq, dv)
            else:
                if lean is None:
                    column_mean = self._column_mean(probs, query_valid)
                average_weights = self._average_weights(column_mean, layout, shape)
                grouped = shape.group_queries(average_weights)                             # (B, Hkv, G, Nk)
                # half maps: a half GEMM (fp32 accumulation) against v as it is, not an fp32 copy of v; the
                # weights' rounding (2⁻⁹ relative each) averages out over the keys
                if half_estimate:
                    average = torch.einsum("bhgn,bhnd->bhgd", grouped.to(v.dtype), v).to(dtype)
                else:
                    average = torch.einsum("bhgn,bhnd->bhgd", grouped, v.to(dtype))
                average = shape.ungroup_queries(average)[:, :, None]
            # σ(g0)σ(g1)·sparse + (1 − σ(g1))·average, applied by the sparse kernel before its store
            open_gate = gates[..., 1].to(dtype)
            mix = (open_gate * gates[..., 0].to(dtype), 1 - open_gate, average)
        stage = _stage("sea.sparse", stage)
        out = self._sparse_attention(q, k, v, selected, layout, scale, mix=mix, row_column=row_column)
        if self.gate is None:
            out = out.to(dtype)
        _stage(None, stage)
        return SEAResult(out, logits, selected, layout, gates, q, k, scale, average_weights)

    @staticmethod
    def _augmented_values(probe: torch.Tensor, v_fit: torch.Tensor) -> torch.Tensor:
        """``[P, v]`` ``(B, Hkv, N, 2d)``: one Triton kernel where it applies (two strided copies took 0.31 ms
        at N = 65,536 on an H100), else two copies into one buffer (torch.cat of the head-broadcast probe
        took 0.57 ms)."""
        from ..kernels.sea_values import augmented_values

        fast = augmented_values(probe, v_fit)
        if fast is not None:
            return fast
        d = v_fit.shape[-1]
        v_aug = v_fit.new_empty(*v_fit.shape[:3], 2 * d)
        v_aug[..., :d] = probe[:, None]
        v_aug[..., d:] = v_fit
        return v_aug

    def _fused_encoder(self, context: torch.Tensor, own_value: torch.Tensor | None):
        """``(e, gates fp32)`` from one Triton kernel (``kernels.sea_encoder``: the encoder's two GEMMs,
        LayerNorm, GELU and the gates' linear, with e written once), or None where it does not apply
        (no gates, no kernel for these maps)."""
        if self.gate is None:
            return None
        from ..kernels.sea_encoder import fast_encoder_and_gates

        return fast_encoder_and_gates(context, own_value, self.encoder.weight, self.encoder.bias,
                                      self.encoder_norm.weight, self.encoder_norm.bias, self.encoder_norm.eps,
                                      self.gate.weight, self.gate.bias)

    def _encode(self, context: torch.Tensor, own_value: torch.Tensor | None, groups: int) -> torch.Tensor:
        """``GELU(LayerNorm(Linear([c, v_i])))`` → ``(B, H, Nq, 2d)``: context ``(B, H, Nq, 2d)``,
        own_value ``(B, Hkv, Nq, d)`` (each query's own value, read by its ``groups`` query heads;
        None: zeros). The linear is split by input block (``W_c c + W_v v_i + b``) so that neither
        the concatenation nor the value repeated per query head is written: at N = 65,536 they
        were ~0.7 ms of SEA's forward on an H100."""
        dtype = context.dtype
        weight, bias = self.encoder.weight.to(dtype), self.encoder.bias.to(dtype)
        width = context.shape[-1]
        on_context, on_value = weight[:, :width], weight[:, width:]
        if own_value is None:
            hidden = torch.nn.functional.linear(context, on_context, bias)
        elif groups == 1:   # one GEMM adds the value term: addmm(W_v v_i + b, c, W_cᵀ)
            value_term = torch.nn.functional.linear(own_value, on_value, bias)
            hidden = torch.addmm(value_term.reshape(-1, value_term.shape[-1]), context.reshape(-1, width),
                                 on_context.t()).view(value_term.shape)
        else:
            B, H, N, _ = context.shape
            hidden = torch.nn.functional.linear(context, on_context, bias)
            value_term = torch.nn.functional.linear(own_value, on_value)               # (B, Hkv, N, 2d)
            hidden = (hidden.view(B, H // groups, groups, N, -1) + value_term[:, :, None]).view(B, H, N, -1)
        return layer_norm(hidden, self.encoder_norm, gelu=True)

    def _estimator_attention(self, q, k, v_aug, *, causal, key_padding_mask, scale, shape) -> torch.Tensor:
        """FAVOR of (q, k, v_aug) → ``(B, H, Nq, 2d)`` in v_aug's dtype (math in its compute dtype): softmax kernel
        (non-causal) or ReLU kernel (causal). q, k come in the input dtype. Fused Triton kernels on
        CUDA, fed half-precision operands when the input is half (the estimate only ranks cells;
        fp32 operands would run the kernels' exact-fp32 dots, ~8× slower: 87 ms against ~1.4 ms
        for FAVOR+ m=256 at N = 65,536 on an H100); the blocks' PyTorch reference otherwise."""
        dtype = compute_dtype(v_aug.dtype)
        projection = self.projection.to(dtype)
        root_scale = scale**0.5
        fast = _fast_estimator(q, k, v_aug, projection, root_scale, causal=causal, key_padding_mask=key_padding_mask)
        if fast is not None:
            return fast.to(v_aug.dtype)
        out_dtype, v_aug = v_aug.dtype, v_aug.to(dtype)
        x, y = q.to(dtype) * root_scale, k.to(dtype) * root_scale
        key_valid = None if key_padding_mask is None else key_padding_mask[:, None, :]
        if causal:
            query_features = relu_features(x, projection, eps=RELU_EPS)
            key_features = zero_padded(relu_features(y, projection, eps=RELU_EPS), key_valid)
            out = causal_kernel_attention(shape.group_queries(query_features), key_features, v_aug,
                                          chunk_size=CHUNK_SIZE, key_valid=key_valid)
            return shape.ungroup_queries(out).to(out_dtype)
        ratio = favor_ratio(self.num_features, hyperbolic=False)
        query_features = favor_query_features(favor_log_features(x, projection, hyperbolic=False),
                                              ratio=ratio, eps=SOFTMAX_EPS, stabilize=True)
        key_features = favor_key_features(favor_log_features(y, projection, hyperbolic=False), key_valid,
                                          ratio=ratio, eps=SOFTMAX_EPS, stabilize=True)
        out = noncausal_kernel_attention(shape.group_queries(query_features), key_features, v_aug)
        return shape.ungroup_queries(out).to(out_dtype)

    @staticmethod
    def _sparse_attention(q, k, v, selected, layout, scale, *, mix=None, row_column=None) -> torch.Tensor:
        """Exact attention on the selected cells, then ``mix`` per row (see apply_row_mix): the Triton
        kernel's output in q's dtype (mixed before its store), else the reference's, mixed in fp32.
        row_column ``(B, H, Nq)`` or None: each row's one selected column, when ``selected`` is
        ``one_hot(row_column)`` (or None: built from it where needed); rows then attend to their
        column's keys without a mask (the one-column kernel, on layouts it covers)."""
        if row_column is not None:
            from ..kernels.single_column_attention import applies, fast_single_column_attention

            if applies(layout):
                fast = fast_single_column_attention(q, k, v, row_column, layout, scale=scale, mix=mix)
                if fast is not None:
                    return fast
            if selected is None:
                selected = torch.nn.functional.one_hot(row_column, layout.columns).bool()
        try:
            from ..kernels.sparse_attention import fast_column_mask_attention
        except ImportError:  # pragma: no cover - the kernel module is optional
            fast_column_mask_attention = None
        if fast_column_mask_attention is not None:
            fast = fast_column_mask_attention(q, k, v, selected, layout, scale=scale, mix=mix)
            if fast is not None:
                return fast
        out = column_mask_attention(q, k, v, selected, layout, scale=scale)
        return out if mix is None else apply_row_mix(out, mix)

    @staticmethod
    def _column_mean(probs: torch.Tensor, query_valid: torch.Tensor | None) -> torch.Tensor:
        """The column mean ``(B, H, T)`` of A_M ``(B, H, Nq, T)`` over the valid query rows."""
        if query_valid is None:
            return probs.mean(dim=2)
        rows = query_valid[:, None, :, None].to(probs.dtype)
        return (probs * rows).sum(dim=2) / rows.sum(dim=2).clamp(min=1)

    def _average_weights(self, column_mean, layout: ColumnLayout, shape: AttentionShape) -> torch.Tensor:
        """Non-causal average-context weights ``(B, H, Nk)`` (sum 1 over the valid keys): the
        column mean of A_M over valid query rows (``(B, H, T)``), read at each key's column."""
        n = layout.row_length[:, :1]                                                    # (B, 1): n_valid
        rank = layout.key_rank
        key_column = column_of_rank(rank.clamp(min=0), n, layout.columns)              # (B, Nk)
        weights = column_mean.gather(-1, key_column[:, None].expand(-1, shape.heads, -1))
        weights = weights * (rank >= 0)[:, None].to(weights.dtype)
        return weights / weights.sum(dim=-1, keepdim=True)

    @staticmethod
    def _causal_average(v, layout: ColumnLayout, key_valid, shape: AttentionShape) -> torch.Tensor:
        """Causal average context ``(B, H, N, dv)``: mean of v over the valid keys ≤ i (0 if none)."""
        # scanned along the last axis: CUDA's scan over an outer axis runs one serial loop per
        # (head, channel), 24 ms at N = 65,536 on an H100
        running = zero_padded(v, key_valid).transpose(-1, -2).cumsum(dim=-1).transpose(-1, -2)
        divisor = layout_derived(layout, ("average_divisor", v.dtype),
                                 lambda: layout.row_length.clamp(min=1)[:, None, :, None].to(v.dtype))
        average = running / divisor
        B, Hkv, N, dv = average.shape
        return average[:, :, None].expand(B, Hkv, shape.groups, N, dv).reshape(B, shape.heads, N, dv)

    # ------------------------------------------------------------------ decoding

    def decoding_state(
        self,
        *,
        batch: int,
        heads: int,
        kv_heads: int,
        value_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SEADecodingState:
        """An empty state for causal token-by-token decoding with :meth:`decode_step`."""
        for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("value_dim", value_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
        self._check_heads(heads)
        self.grouping(True)
        d, m = self.head_dim, self.num_features
        work = compute_dtype(dtype)
        device = torch.device(device) if device is not None else self.projection.device
        zeros = lambda *size, dt=work: torch.zeros(*size, dtype=dt, device=device)  # noqa: E731
        return SEADecodingState(
            batch=batch, heads=heads, kv_heads=kv_heads, value_dim=value_dim, dtype=dtype, compute_dtype=work,
            feature_values=zeros(batch, kv_heads, m, 2 * d),
            feature_sum=zeros(batch, kv_heads, m),
            value_sum=zeros(batch, kv_heads, value_dim),
            conv_history=self.causal_decoder.initial_history(zeros(1), batch, heads),
            keys=zeros(batch, kv_heads, 0, d, dt=dtype),
            values=zeros(batch, kv_heads, 0, value_dim, dt=dtype),
        )

    def _advance_estimator(self, q, k, v, state: SEADecodingState, scale: float, shape: AttentionShape):
        """Tokens ``state.position …`` (q ``(B, H, n, d)``, k, v ``(B, Hkv, n, ·)``) into the running sums
        of ``state`` (the causal estimator's ReLU-kernel sums, and the values' sum for the gates' average
        context); returns (the queries' features grouped ``(B, Hkv, G, n, m)``, the keys' ``(B, Hkv, n, m)``,
        v fitted to width d, [probe, v]), in the state's compute dtype. The caller moves ``state.position`` on."""
        dtype, d, n, start = state.compute_dtype, self.head_dim, k.shape[2], state.position
        v_fit = fit_width(v.to(dtype), d)
        probe = self.causal_probe[start:start + n].to(dtype).expand(state.batch, state.kv_heads, n, d)
        v_aug = torch.cat([probe, v_fit], dim=-1)                                        # (B, Hkv, n, 2d)
        projection, root_scale = self.projection.to(dtype), scale**0.5
        key_features = relu_features(k.to(dtype) * root_scale, projection, eps=RELU_EPS)
        state.feature_values += key_features.transpose(-1, -2) @ v_aug
        state.feature_sum += key_features.sum(dim=2)
        if self.gate is not None:
            state.value_sum += v.to(dtype).sum(dim=2)
        query_features = shape.group_queries(relu_features(q.to(dtype) * root_scale, projection, eps=RELU_EPS))
        return query_features, key_features, v_fit, v_aug

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
        rows_per_block: int = 256,
    ) -> SEADecodingState:
        """The decoding state after a causal prompt, q ``(B, H, n, d)``, k ``(B, Hkv, n, d)``, v
        ``(B, Hkv, n, dv)`` (no padding), in one pass: what n :meth:`decode_step` calls from an
        empty state leave (up to summation order). The estimator's running sums are one product;
        the decoder's history needs the estimator rows of every prompt query, taken causally in
        blocks of ``rows_per_block`` queries (memory O(rows_per_block · n) per head)."""
        shape, scale = check_inputs(q, k, v, scale=scale)
        B, H, n, _ = q.shape
        if n > self.options["max_positions"]:
            raise ValueError(f"q: the learned causal probe has max_positions={self.options['max_positions']} rows; "
                             f"the prompt has {n} tokens (build with a larger max_positions)")
        if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or rows_per_block < 1:
            raise ValueError(f"rows_per_block: expected a positive int, got {rows_per_block!r}")
        state = self.decoding_state(batch=B, heads=H, kv_heads=k.shape[1], value_dim=v.shape[-1], device=q.device,
                                    dtype=q.dtype)
        query_features, key_features, v_fit, v_aug = self._advance_estimator(q, k, v, state, scale, shape)
        state.keys, state.values, state.position = k.clone(), v.clone(), n

        # the estimator row of every prompt query, causally (decode_step's context, all rows at once)
        keys = key_features[:, :, None]                                                  # (B, Hkv, 1, n, m)
        rows = []
        for start in range(0, n, rows_per_block):
            stop = min(n, start + rows_per_block)
            weights = query_features[..., start:stop, :] @ keys[..., :stop, :].transpose(-1, -2)
            future = torch.ones(stop - start, stop, dtype=torch.bool, device=q.device).triu(start + 1)
            weights = weights.masked_fill(future, 0.0)
            rows.append((weights @ v_aug[:, :, None, :stop]) / weights.sum(-1, keepdim=True))
        context = shape.ungroup_queries(torch.cat(rows, dim=-2))                         # (B, H, n, 2d)
        e = self._encode(context, v_fit, shape.groups)

        state.conv_history = self.causal_decoder.history_after(e)
        return state

    def decode_step(
        self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: SEADecodingState,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Causal attention output of the next token: q_t ``(B, H, 1, d)``, k_t ``(B, Hkv, 1, d)``,
        v_t ``(B, Hkv, 1, dv)`` → ``(B, H, 1, dv)``; equals row t of the full causal forward.

        Costs O(m·d + d² + T·c² + k·d) per head and token: the estimator and CNN advance by one row
        from ``state``, and only the keys of the selected columns (contiguous rank ranges) are
        gathered from the cache.
        """
        if not isinstance(state, SEADecodingState):
            raise TypeError(f"state: expected a SEADecodingState (from decoding_state), got {type(state).__name__}")
        expected = {"q_t": (state.batch, state.heads, 1, self.head_dim),
                    "k_t": (state.batch, state.kv_heads, 1, self.head_dim),
                    "v_t": (state.batch, state.kv_heads, 1, state.value_dim)}
        for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name}: expected shape {expected[name]} (from the decoding state), got {tuple(t.shape)}")
            if t.dtype != state.dtype:
                raise TypeError(f"{name}: expected dtype {state.dtype} (the decoding state's), got {t.dtype}")
        _, scale = check_inputs(q_t, k_t, v_t, scale=scale)
        position = state.position
        if position >= self.options["max_positions"]:
            raise ValueError(
                f"decode_step: the learned causal probe has max_positions={self.options['max_positions']} rows; "
                f"token {position} is past it (build with a larger max_positions)"
            )
        d, T, dtype = self.head_dim, self.options["columns"], state.compute_dtype
        shape = AttentionShape(state.batch, state.heads, state.kv_heads, 1, position + 1, d, state.value_dim)

        # estimator: one more key in the running ReLU-kernel sums, then the new query row
        query_features, _, v_fit, _ = self._advance_estimator(q_t, k_t, v_t, state, scale, shape)
        state.append(k_t, v_t)
        length = position + 1
        numerator = torch.einsum("bhgim,bhmd->bhgid", query_features, state.feature_values)
        denominator = torch.einsum("bhgim,bhm->bhgi", query_features, state.feature_sum)
        context = shape.ungroup_queries(numerator / denominator[..., None])          # (B, H, 1, 2d)

        e = self._encode(context, v_fit, shape.groups)
        logits, state.conv_history = self.causal_decoder.step(e, state.conv_history)
        probs = torch.softmax(logits, dim=-1)
        row_length = torch.full((state.batch, 1), length, dtype=torch.int64, device=q_t.device)
        column = torch.arange(T, device=q_t.device)
        lo, hi = column_rank_range(column, row_length[:, :, None], T)                  # (B, 1, T)
        selected = select_cells(probs, hi > lo, row_length, k=self.options["k"], grouping=self.grouping(True))

        sparse = self._decode_sparse(q_t.to(dtype), state, selected[:, :, 0], lo[:, 0], hi[:, 0], scale, shape)
        if self.gate is None:
            return sparse.to(q_t.dtype)
        gates = torch.sigmoid(linear(e, self.gate))
        average = (state.value_sum / length)[:, :, None, None].expand(-1, -1, shape.groups, -1, -1)
        average = average.reshape(state.batch, state.heads, 1, state.value_dim)
        mix = gates[..., 1:2]
        return (mix * gates[..., 0:1] * sparse + (1 - mix) * average).to(q_t.dtype)

    @staticmethod
    def _decode_sparse(q, state: SEADecodingState, selected, lo, hi, scale, shape: AttentionShape) -> torch.Tensor:
        """Exact softmax of q ``(B, H, 1, d)`` over the cached keys of the selected columns only.

        selected ``(B, H, T)``; column c holds the positions ``[lo_c, hi_c)`` (no padding while
        decoding, so rank = position). Gathers at most (selected columns)·⌈t/T⌉ keys per head.
        """
        B, H, T = selected.shape
        count = selected.sum(dim=-1)                                                    # (B, H)
        most = int(count.max())
        widest = int((hi - lo).max())
        order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices[..., :most]   # (B, H, S)
        used = torch.arange(most, device=q.device) < count[..., None]
        start = lo[:, None].expand(B, H, T).gather(-1, order)
        stop = hi[:, None].expand(B, H, T).gather(-1, order)
        position = start[..., None] + torch.arange(widest, device=q.device)           # (B, H, S, W)
        valid = (used[..., None] & (position < stop[..., None])).flatten(2)           # (B, H, S·W)
        position = torch.where(valid, position.flatten(2), torch.zeros_like(valid, dtype=torch.int64))
        grouped = shape.group_queries(position)                                         # (B, Hkv, G, S·W)
        G, picks = shape.groups, grouped.shape[-1]

        def gather(cache: torch.Tensor) -> torch.Tensor:
            # a broadcast view of the cache per query head; only the picked rows are read and cast
            source = cache[:, :, None].expand(B, shape.kv_heads, G, *cache.shape[2:])
            index = grouped[..., None].expand(B, shape.kv_heads, G, picks, cache.shape[-1])
            return source.gather(3, index).reshape(B, H, picks, cache.shape[-1]).to(q.dtype)

        logits = (gather(state.keys) @ q.transpose(-1, -2)).squeeze(-1) * scale         # (B, H, S·W)
        logits = logits.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return (probs[..., None, :] @ gather(state.values))                              # (B, H, 1, dv)


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):
    """fp32 CUDA matmuls on TF32 tensor cores inside the block (torch's switch is process-wide,
    so it is restored on the way out). ``APPROXATTN_SEA_TF32=0`` keeps exact fp32 (A/B checks)."""
    if not enabled or os.environ.get("APPROXATTN_SEA_TF32", "1") == "0":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _stage(name: str | None, previous: torch.profiler.record_function | None = None):
    """Close the previous named profiler range and open ``name`` (None: just close): lets a
    ``torch.profiler`` trace attribute SEA's time to its stages (benchmarks/sea_stages.py)."""
    if previous is not None:
        previous.__exit__(None, None, None)
    if name is None:
        return None
    stage = torch.profiler.record_function(name)
    stage.__enter__()
    return stage


def _half_operands(q: torch.Tensor) -> bool:
    """Whether the estimator takes half-precision operands: half inputs on the fused path."""
    from ..kernels.dispatch import kernels_enabled

    return q.dtype in (torch.float16, torch.bfloat16) and kernels_enabled(q)


def _fast_estimator(q, k, v_aug, projection, root_scale, *, causal, key_padding_mask) -> torch.Tensor | None:
    """The estimator through the fused kernel-attention kernels where they apply (CUDA, no grad for
    the projection), else None."""
    from ..kernels.dispatch import kernels_enabled, supported
    from ..kernels.config import FeatureConfig

    if not kernels_enabled(q):
        return None
    if causal:
        cfg = FeatureConfig("relu", projection, x_scale=root_scale, eps=RELU_EPS)
    else:
        cfg = FeatureConfig("favor", projection, x_scale=root_scale,
                            ratio=favor_ratio(projection.shape[0], hyperbolic=False), eps=SOFTMAX_EPS, stabilize=True)
    v_aug = v_aug.to(q.dtype)  # half operands for half inputs (see SEAAttention._estimator_attention)
    if not supported(cfg, q, k, v_aug, causal):
        return None
    from ..kernels.ops import unchecked_feature_attention  # the module checked its inputs

    return unchecked_feature_attention(q, k, v_aug, cfg, causal=causal, key_padding_mask=key_padding_mask)


# ----------------------------------------------------------------------------- cost


def sea_cost(shape: Shape, options: dict) -> Cost:
    b, h, hk = shape.batch, shape.heads, shape.kv_heads
    nq, nk, d, dv = shape.seq_q, shape.seq_k, shape.head_dim, shape.value_dim
    T, k = options["columns"], min(options["k"], nk)
    m = options["num_features"] or default_num_features(d)
    rows = b * h * nq
    flops = 2.0 * (rows + b * hk * nk) * d * m                     # feature projections
    flops += 2.0 * b * hk * nk * m * (2 * d + 1) + 2.0 * rows * m * (2 * d + 1)   # φ(k)ᵀ[v_aug, 1], φ(q)·state
    flops += 2.0 * rows * (3 * d) * (2 * d)                        # encoder
    if shape.causal:
        width = math.ceil(T / 4)
        channels = 2 * (h if options["num_heads"] else 1)
        groups = b if options["num_heads"] else b * h
        flops += 2.0 * rows * 2 * d * 2 * width                    # row decoder
        flops += 2.0 * groups * nq * width * channels * channels * 9 * 2   # two dilated 3×3 convs
        flops += 2.0 * groups * nq * 4 * width * channels * (channels // 2)   # 1×1 conv
    else:
        width = math.ceil(T / 2)
        channels = 4 * (h if options["num_heads"] else 1)
        groups = b if options["num_heads"] else b * h
        flops += 2.0 * rows * 2 * d * 4 * width                    # row decoder
        flops += 2.0 * groups * nq * width * channels * channels * 9   # stride-2 conv + middle conv (N/2 rows each)
        flops += 2.0 * groups * nq * width * channels * (channels // 4) * 9   # last conv
    flops += rows * T * math.log2(max(T, 2))                       # top-k (comparisons)
    flops += 2.0 * rows * k * (d + dv)                             # sparse q·k and p·v
    flops += 2.0 * rows * 2 * d * 2 + 2.0 * b * hk * nk * dv       # gates, average context
    exps = float(b * (h * nq + hk * nk) * m) * (0 if shape.causal else 1) + rows * (T + k)
    intermediate = rows * (m + 2 * d + 2 * d + 2 * T + T) + b * hk * nk * (m + 2 * d)
    sparse_scores = rows * k
    return Cost(
        flops=flops,
        exps=exps,
        bytes_moved=shape.io_bytes + 4.0 * 2 * intermediate + 8.0 * rows * T / 8,
        peak_memory=4.0 * (intermediate + sparse_scores),
    )


SEA_COST_DOC = (
    "per call (R = B·H·Nq rows, m features, w = ⌈T/2⌉ (⌈T/4⌉ causal), c CNN channels = 4 (2 causal) per "
    "head-group): flops = 2·(R + B·Hkv·Nk)·d·m (features) + 2·(B·Hkv·Nk + R)·m·(2d+1) (FAVOR of [P, v]) "
    "+ 2·R·3d·2d (encoder) + 2·R·2d·4w (2w causal; row decoder) + CNN 2·groups·Nq·w·c²·9·2 (3×3 convs) "
    "+ R·T·log2 T (top-k) + 2·R·k·(d+dv) (sparse softmax) + gates and average context; "
    "exps = FAVOR+ features (non-causal) + R·(T + k); bytes = q,k,v,o + fp32 intermediates (features, "
    "c, e, CNN maps, logits) written and read once; peak = those intermediates + R·k sparse scores"
)


def _grouping_option() -> Option:
    return choice_option(
        "grouping", "auto",
        "who shares the top-k budget: 'batch' (all heads and rows of a sample), 'head' (rows of a head), "
        "'query' (each head's row alone), 'causal_batch' (the heads of a row); 'auto' = batch non-causal, "
        "causal_batch causal (batch/head are rejected with causal=True)",
        ("auto",) + GROUPINGS,
    )


register(MethodSpec(
    name="sea",
    family="sparse",
    summary="SEA: a Performer + CNN estimates a compressed attention mask; exact softmax on about k keys per row",
    reference="Lee, Kim, Willette, Hwang, SEA: Sparse Linear Attention with Estimated Attention Mask, ICLR 2024",
    supports_causal=True,
    kv_cache_decoding=False,  # causal rows come from a causal estimator and decoder: decode_step
    options=(
        int_option("k", 64, "keys per query row kept on average (the top-k budget, in keys)"),
        int_option("columns", 128, "T: width of the compressed attention estimate (SEA's attention_predictor_length)"),
        int_option("num_features", None, "random features m of the estimator; None: int(d·ln d / 8) (SEA's OPT "
                   "script, performer_nb_factor = 8)", allow_none=True),
        _grouping_option(),
        bool_option("gates", True, "per-(head, row) gates σ(g0) on the sparse probabilities and σ(g1) mixing in the "
                    "average context; False: the output is the sparse softmax alone (the dense limit)"),
        bool_option("decoder_residual", True, "non-causal only (the causal probe is learned): add the log of the "
                    "Performer's position histogram to the decoder's logits and zero-initialise its last conv, so "
                    "an undistilled SEA selects keys from the Performer's estimate; False: the paper's decoder"),
        int_option("num_heads", None, "None: one CNN shared by all heads (heads in the batch); an int: the "
                   "paper's decoder with heads as CNN channels (then q must have exactly that many heads)",
                   allow_none=True),
        bool_option("half_estimate", True, "at inference (no autograd) with fp16/bf16 inputs on the fused GPU path, "
                    "store the estimator's maps (context, encoder, decoder CNN, logits) in the input dtype, every "
                    "sum in fp32; False: fp32 maps (TF32 GEMMs), slower and with fewer near-tie flips of the "
                    "selected cells against an fp32 run"),
        int_option("max_positions", 2048, "rows of the learned causal positional probe (longer causal inputs "
                   "stretch it by nearest interpolation)"),
        redraw_option(1000),
        seed_option(),
    ),
    exact_limit=ExactLimit(
        parent="softmax",
        description="k = N with grouping='query' and gates off: every column is kept, so the output is exact "
                    "softmax attention on the student's q, k",
        options=lambda n: {"k": n, "grouping": "query", "gates": False},
    ),
    cost_formula=sea_cost,
    cost_doc=SEA_COST_DOC,
    module_class=SEAAttention,
    example_options=lambda n: {"k": 4, "columns": 16, "num_features": 16},
))
