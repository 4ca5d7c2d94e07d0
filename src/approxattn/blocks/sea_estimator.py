"""SEA's attention estimator pieces: positional probes, decoders (row MLP + CNN), causal convs.

Shapes: ``e (B, H, N, 2d)`` is the encoder output per (head, query row); a decoder turns it into
logits ``(B, H, N, T)`` over T compressed columns. Heads are CNN channels when the decoder is
built with ``num_heads`` (SEA's design: the CNN mixes heads); with ``num_heads=None`` every head
runs the same small CNN (heads folded into the batch, weights shared across heads).

All layers run in the dtype of their input (weights are cast), so a module kept in fp32 serves
fp32/fp64 inputs; callers feed fp32 for half-precision inputs.
"""

from __future__ import annotations

import math
import os
import weakref
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cached import handed_out, version
from ..validation import compute_dtype
from .fast_kernels import fast_kernel


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def layer_norm(x: torch.Tensor, layer: nn.LayerNorm, *, gelu: bool = False) -> torch.Tensor:
    """``layer`` over x's last axis, then exact GELU if asked. At inference on CUDA one Triton kernel
    (``kernels.layer_norm``: torch's kernel idles on SEA's 32–128-wide rows, and GELU comes fused)."""
    weight, bias = layer.weight.to(x.dtype), layer.bias.to(x.dtype)
    fast = fast_kernel("layer_norm", "fast_layer_norm")
    if fast is not None:
        out = fast(x, weight, bias, layer.eps, gelu=gelu)
        if out is not None:
            return out
    y = F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    return F.gelu(y) if gelu else y


def conv2d(x: torch.Tensor, layer: nn.Conv2d, *, pad: tuple[int, int, int, int] = (0, 0, 0, 0), relu: bool = False,
           upsample_rows: int = 1, rows: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``layer`` (stride and dilation its own) over x ``(S, C, R, W)`` after a nearest upsample of the
    rows ×``upsample_rows`` cropped to ``rows`` rows and zero padding ``pad`` = (left, right, top,
    bottom), then ReLU if asked; the output in ``out_dtype`` (default x's). At inference on CUDA
    with few channels, one Triton kernel
    (``kernels.small_conv``: cuDNN is far off the memory floor with 4 channels, and the kernel also
    skips the upsampled and padded copies); ``F.conv2d`` otherwise."""
    weight, bias = layer.weight.to(x.dtype), layer.bias.to(x.dtype)
    if layer.stride[1] == 1:
        fast = fast_kernel("small_conv", "fast_small_conv2d")
        if fast is not None:
            out = fast(x, weight, bias, stride_rows=layer.stride[0], dilation=layer.dilation, pad_left=pad[0],
                       pad_right=pad[1], pad_top=pad[2], pad_bottom=pad[3], upsample_rows=upsample_rows,
                       virtual_rows=rows, relu=relu, out_dtype=out_dtype)
            if out is not None:
                return out
    if out_dtype is not None and out_dtype != x.dtype:   # the torch path computes in the output dtype
        x, weight, bias = x.to(out_dtype), weight.to(out_dtype), bias.to(out_dtype)
    if upsample_rows > 1:
        x = x.repeat_interleave(upsample_rows, dim=2)[:, :, :rows]
    left, right, top, bottom = pad
    if left == right and top == bottom:    # conv2d pads symmetric borders itself, without a padded copy
        out = F.conv2d(x, weight, bias, stride=layer.stride, padding=(top, left), dilation=layer.dilation)
    else:
        out = F.conv2d(F.pad(x, pad), weight, bias, stride=layer.stride, dilation=layer.dilation)
    return F.relu(out) if relu else out


def resize_width(x: torch.Tensor, width: int, *, plus: torch.Tensor | None = None) -> torch.Tensor:
    """Linear resampling of the last axis to ``width`` (half-pixel centres: the same numbers as
    ``F.interpolate(mode="linear", align_corners=False)``), as one matmul with the small
    ``(w, width)`` interpolation matrix, plus ``plus`` (x's shape with ``width`` last) if given,
    added inside the GEMM (one pass over the result less). ``F.interpolate`` itself runs a kernel
    that loops over the batch per output element: 483 ms for (1M rows, 64 → 128) on an H100,
    against a GEMM of well under a millisecond."""
    if x.shape[-1] == width:
        return x if plus is None else x + plus
    matrix = interpolation_matrix(x.shape[-1], width, dtype=x.dtype, device=x.device)
    if plus is None:
        return x @ matrix
    out_shape = (*x.shape[:-1], width)
    return torch.addmm(plus.reshape(-1, width), x.reshape(-1, x.shape[-1]), matrix).view(out_shape)


def interpolation_matrix(source: int, width: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(source, width)``: column j holds the two linear weights of output j, read at
    ``max(0, (j + ½)·source/width − ½)`` (PyTorch's rule for ``align_corners=False``). Cached: built
    on the host, it would otherwise cost a host-to-device copy on every forward. Read-only; built
    outside inference mode so that a matrix first made under ``torch.inference_mode`` can still be
    saved for a later backward."""
    return handed_out(_cached_interpolation_matrix(source, width, dtype, device))


@lru_cache(maxsize=16)
def _cached_interpolation_matrix(source: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return _interpolation_matrix(source, width).to(device=device, dtype=dtype)


def _interpolation_matrix(source: int, width: int) -> torch.Tensor:
    position = ((torch.arange(width, dtype=torch.float64) + 0.5) * (source / width) - 0.5).clamp(min=0.0)
    lower = position.floor().to(torch.int64).clamp(max=source - 1)
    upper = (lower + 1).clamp(max=source - 1)
    frac = position - lower.to(torch.float64)
    matrix = torch.zeros(source, width, dtype=torch.float64)
    columns = torch.arange(width)
    matrix.index_put_((lower, columns), 1.0 - frac, accumulate=True)
    matrix.index_put_((upper, columns), frac, accumulate=True)
    return matrix


def fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x (..., w)`` cut or zero-padded to ``width`` channels (values of another width than d)."""
    if x.shape[-1] == width:
        return x
    if x.shape[-1] > width:
        return x[..., :width]
    return F.pad(x, (0, width - x.shape[-1]))


# ----------------------------------------------------------------------------- probes


def relative_position_probe(key_rank: torch.Tensor, n_valid: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Non-causal probe ``(B, Nk, d)``: the d×d identity resampled bilinearly at ``rank/(n−1)``.

    Row j is a hat function over d bins centred at ``rank_j·(d−1)/(n_valid−1)``: a soft one-hot
    of where key j sits among the valid keys (SEA's ``grid_sample`` of ``eye(d)`` with
    ``align_corners=True``). Padded keys (rank −1) get zero rows. key_rank ``(B, Nk)``,
    n_valid ``(B,)``.
    """
    spread = (n_valid - 1).clamp(min=1).to(dtype)[:, None]
    centre = key_rank.to(dtype) / spread * (dim - 1)                        # (B, Nk)
    bins = torch.arange(dim, device=key_rank.device, dtype=dtype)
    probe = (1.0 - (bins - centre[..., None]).abs()).clamp(min=0.0)
    return probe * (key_rank >= 0)[..., None].to(dtype)


def learned_probe_rows(table: torch.Tensor, key_rank: torch.Tensor, n_valid: torch.Tensor, *,
                       row_index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal probe ``(B, Nk, d)``: row ``rank_j`` of the learned table ``(max_positions, d)``.

    When a sample has more valid keys n than the table has rows, the table is stretched by
    nearest-neighbour interpolation to n rows (SEA's long-context path); outputs then depend on n,
    so strict causality holds only for n ≤ max_positions. Padded keys get zero rows.
    row_index: :func:`probe_row_index` of these arguments, when the caller keeps it.
    """
    index, weight = row_index if row_index is not None else probe_row_index(key_rank, n_valid, table.shape[0],
                                                                            table.dtype)
    return table[index] * weight


def probe_row_index(key_rank: torch.Tensor, n_valid: torch.Tensor, rows: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The table row each key reads in :func:`learned_probe_rows` ``(B, Nk)`` int64, and its weight
    ``(B, Nk, 1)`` in ``dtype`` (0 at padded keys): a function of the layout, kept per layout."""
    rank = key_rank.clamp(min=0)
    n = n_valid[:, None]
    index = torch.where(n > rows, torch.div(rank * rows, n.clamp(min=1), rounding_mode="floor"), rank)
    return index.clamp(max=rows - 1), (key_rank >= 0)[..., None].to(dtype)


def probe_histogram_logits(
    histogram: torch.Tensor, n_valid: torch.Tensor, columns: int, *, floor: float = 1e-6
) -> torch.Tensor:
    """Log of the probe histogram resampled from d bins to T columns, ``(B, H, Nq, T)``.

    histogram ``(B, H, Nq, d)``: the first d channels of the Performer context, ≈ Σ_j A_ij P_j,
    i.e. how row i's attention mass spreads over the d position bins. Column c's centre holds
    rank ``(c + ½)·n/T − ½``, i.e. bin ``rank·(d−1)/(n−1)``; the histogram is read there by linear
    interpolation, clamped below by ``floor`` and logged. n_valid ``(B,)``.

    The interpolation is one matmul with :func:`histogram_resampling` (per sample ``(d, T)``, two
    weights a column): gathering the two bins and blending them took five passes over the
    ``(B, H, Nq, T)`` map, 3.5 ms of SEA's forward at N = 65,536 on an H100.
    """
    # weights from fp32 (or fp64) positions, then in the histogram's dtype for the matmul
    weights = histogram_resampling(n_valid, histogram.shape[-1], columns, compute_dtype(histogram.dtype))
    return torch.log(torch.clamp_min(histogram @ weights.to(histogram.dtype)[:, None], floor))


def histogram_resampling(n_valid: torch.Tensor, dim: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, d, T)``: column c holds the linear-interpolation weights that read d bins at bin
    ``rank_c·(d−1)/(n−1)``, ``rank_c = (c + ½)·n/T − ½`` (see :func:`probe_histogram_logits`)."""
    n = n_valid.to(dtype)[:, None]
    centre_rank = (torch.arange(columns, device=n_valid.device, dtype=dtype)[None] + 0.5) * n / columns - 0.5
    position = (centre_rank / (n - 1).clamp(min=1) * (dim - 1)).clamp(0.0, dim - 1)     # (B, T)
    lower = position.floor().to(torch.int64).clamp(max=dim - 1)
    upper = (lower + 1).clamp(max=dim - 1)
    frac = position - lower.to(dtype)
    weights = torch.zeros(n_valid.shape[0], dim, columns, device=n_valid.device, dtype=dtype)
    weights.scatter_add_(1, lower[:, None], (1 - frac)[:, None])
    weights.scatter_add_(1, upper[:, None], frac[:, None])
    return weights


# ----------------------------------------------------------------------------- convolutions


class CausalConv2d(nn.Module):
    """A 2-D convolution over (rows = query positions, width = columns) in which output row i
    sees input rows ≤ i only: all row padding goes on top (SEA masks the lower half of a taller
    kernel instead; same function). Width padding keeps the width.

    ``step`` computes one new row from the rows kept in ``history`` (``rows_needed`` of them),
    the decoding form of the same convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.rows_needed = dilation * (kernel_size - 1)
        self.width_padding = dilation * (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
        """x ``(N, C, rows, W)`` → ``(N, C_out, rows, W)`` (then ReLU if asked)."""
        return conv2d(x, self.conv, pad=(self.width_padding, self.width_padding, self.rows_needed, 0), relu=relu)

    def initial_history(self, x_like: torch.Tensor, batch: int) -> torch.Tensor:
        """The zero rows that stand above row 0 (the forward's top padding), ``(N, C, rows_needed, W)``."""
        return x_like.new_zeros(batch, self.conv.in_channels, self.rows_needed, x_like.shape[-1])

    def step(self, row: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """row ``(N, C, 1, W)``, history ``(N, C, rows_needed, W)`` → (output row, new history)."""
        window = torch.cat([history, row], dim=2)
        out = conv2d(window, self.conv, pad=(self.width_padding, self.width_padding, 0, 0))
        return out, window[:, :, 1:]


def conv_row_matrices(weight: torch.Tensor, width: int) -> torch.Tensor:
    """``(KH, Ci·W, Co·W)``: a KH×3 convolution (width padding 1, stride 1 across the width) of maps
    ``(Ci, rows, W)`` as one matrix per row tap, so that output row r = Σ_kr (input row r + kr − pad)
    flattened channel-major ``(ci·W + w)`` @ matrix[kr] (flattened ``co·W + w``): entry
    ``[ci·W + w_in, co·W + w_out] = weight[co, ci, kr, kc]`` where ``w_in = w_out + kc − 1`` lies in the
    width (zero padding). In the weight's dtype."""
    co, ci, kh, kw = weight.shape
    if kw != 3:
        raise ValueError(f"weight: expected 3 columns (width padding 1), got shape {tuple(weight.shape)}")
    taps = []
    for kr in range(kh):
        tap = weight.new_zeros(ci * width, co * width)
        for kc in range(kw):
            # shift[w_in, w_out] = 1 where w_in = w_out + kc − 1, i.e. on diagonal (1 − kc)
            offset = 1 - kc
            shift = torch.diag(weight.new_ones(width - abs(offset)), diagonal=offset)
            tap += torch.kron(weight[:, :, kr, kc].t().contiguous(), shift)
        taps.append(tap)
    return torch.stack(taps)


def _split_channels(x: torch.Tensor, splits: int, mix_heads: bool) -> torch.Tensor:
    """``(B, H, N, splits·W)`` → CNN input: ``(B, H·splits, N, W)`` (heads as channels) or
    ``(B·H, splits, N, W)`` (heads in the batch). SEA's ``ChannelSplit``: channel = h·splits + s."""
    B, H, N, width = x.shape
    x = x.reshape(B, H, N, splits, width // splits).permute(0, 1, 3, 2, 4)
    return x.reshape(B, H * splits, N, width // splits) if mix_heads else x.reshape(B * H, splits, N, width // splits)


def _check_heads(num_heads: int | None, heads: int) -> None:
    if num_heads is not None and heads != num_heads:
        raise ValueError(
            f"q: expected {num_heads} heads (the SEA module was built with num_heads={num_heads}, whose "
            f"decoder CNN has heads as channels), got {heads}; build with num_heads=None for any head count"
        )


def _env_choice(variable: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``variable``, one of ``choices`` (the first when unset)."""
    choice = os.environ.get(variable, choices[0])
    if choice not in choices:
        raise ValueError(f"{variable}: expected one of {', '.join(map(repr, choices))}, got {choice!r}")
    return choice


def _head_choice() -> str:
    """The non-causal decoder's fused head: the kernel (default) or ``APPROXATTN_SEA_HEAD=gemm``."""
    return _env_choice("APPROXATTN_SEA_HEAD", ("kernel", "gemm"))


def _middle_choice() -> str:
    """The non-causal decoder's middle conv on the row-GEMM path: the band kernel over a position-major map
    (default, ``kernels.band_conv``) or ``APPROXATTN_SEA_MIDDLE=gemm``, a row-window GEMM over the whole band."""
    return _env_choice("APPROXATTN_SEA_MIDDLE", ("band", "gemm"))


class RowGemmWeights(NamedTuple):
    """The non-causal decoder's GEMM weights (:meth:`NonCausalDecoder._row_gemm_matrices`)."""

    first: torch.Tensor                   # (3, 2d, 4W): the row linear folded into the strided conv, channel-major
    first_taps: torch.Tensor              # (3, 4W): the row linear's bias through each tap
    first_bias: torch.Tensor              # (4W,)
    middle: torch.Tensor                  # (3, 4W, 4W): the middle conv's tap matrices
    middle_bias: torch.Tensor             # (4W,)
    head: torch.Tensor                    # (3, 4W, T): the output conv then the width resize, fp32
    head_bias: torch.Tensor               # (T,)
    first_positions: torch.Tensor         # first, first_taps, first_bias with columns position-major (w·4 + c)
    first_taps_positions: torch.Tensor
    first_bias_positions: torch.Tensor
    band: torch.Tensor                    # the middle conv's band_conv.band_tile


# decoder -> (weak references to its parameters, their versions + dtype + device, the GEMM weights);
# outside the module so that it pickles and copies as before
_ROW_GEMM_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


class NonCausalDecoder(nn.Module):
    """SEA's non-causal decoder (BERT): ``Linear_{2d→4·T/2}`` → ChannelSplit(4) → CNN → width T.

    CNN: ``Conv3×3(c→c, stride (2,1))`` → ReLU → ``Conv3×3(c→c)`` → ReLU → nearest upsample of
    the rows ×2 (cropped back to N rows) → ``Conv3×3(c→H)``, c = 4H (or 4 → 1 per head), then a
    linear resize of the width from ⌈T/2⌉ to T. ``zero_last`` zero-initialises the last conv (used
    with the histogram residual so that an untrained decoder adds nothing).
    """

    splits = 4

    def __init__(self, head_dim: int, columns: int, num_heads: int | None, *, zero_last: bool) -> None:
        super().__init__()
        self.columns = columns
        self.num_heads = num_heads
        self.width = math.ceil(columns / 2)
        heads = num_heads or 1
        channels = self.splits * heads
        self.row = nn.Linear(2 * head_dim, self.splits * self.width)
        # padding=0: forward pads explicitly (the fused kernel takes the pads as arguments)
        self.down = nn.Conv2d(channels, channels, 3, stride=(2, 1))
        self.middle = nn.Conv2d(channels, channels, 3)
        self.out = nn.Conv2d(channels, heads, 3)
        if zero_last:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, e: torch.Tensor, *, plus: torch.Tensor | None = None) -> torch.Tensor:
        """e ``(B, H, N, 2d)`` → logits ``(B, H, N, T)`` (+ ``plus`` of that shape, e.g. a residual)."""
        return self._head(self._middle(e), e.shape[:3], plus)

    def logits_and_probs(self, e: torch.Tensor, *, histogram: torch.Tensor | None = None,
                         n_valid: torch.Tensor | None = None, probs_dtype: torch.dtype = torch.float32,
                         floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """e ``(B, H, N, 2d)`` → (logits ``(B, H, N, T)``, their softmax over T in ``probs_dtype``, each
        row's argmax of it ``(B, H, N)`` from the fused kernel or None),
        with ``log(histogram resized to T)`` added to the logits when a histogram ``(B, H, N, d)``
        and n_valid ``(B,)`` are given (:func:`probe_histogram_logits`). At inference on CUDA with
        one CNN per head, the output conv, resize, residual and softmax run as one Triton kernel
        (``kernels.sea_decoder_head``: unfused they were seven passes over ``(B, H, N, T)`` maps)."""
        B, H, N, _ = e.shape
        T = self.columns
        fused = self._row_gemm_logits_and_probs(e, histogram, n_valid, floor) if probs_dtype == torch.float32 else None
        if fused is not None:
            return fused
        y = self._middle(e)
        if self.num_heads is None and probs_dtype == torch.float32:
            fast = self._kernel_head(y, e.shape[:3], histogram, n_valid, floor)
            if fast is not None:
                return fast
        residual = None if histogram is None else probe_histogram_logits(histogram, n_valid, T, floor=floor)
        logits = self._head(y, (B, H, N), residual)
        return logits, torch.softmax(logits, dim=-1, dtype=probs_dtype), None

    def _row_gemm_logits_and_probs(self, e, histogram, n_valid, floor):
        """:meth:`logits_and_probs` through row-window GEMMs (``kernels.row_window_gemm``), or None where
        they do not apply (half maps at inference, one CNN per head, a kernel-enabled device): the row
        linear folded into the strided conv, then the middle conv, on tensor cores (no ``(B, H, N, 4·W)``
        map is written; on an H100 at N = 65,536 the two took 1.0 ms against 1.8 for the linear and
        two direct convolutions). The head is the fused head kernel over that map, or with
        ``APPROXATTN_SEA_HEAD=gemm`` a third GEMM with the width resize folded in and the residual,
        softmax and argmax in its epilogue (slower as tuned so far)."""
        if not self._row_gemms_apply(e, histogram):
            return None
        from ..kernels.row_window_gemm import window_gemm_softmax

        B, H, N, _ = e.shape
        T = self.columns
        head_choice = _head_choice()
        y = self._row_gemm_map(e)
        if head_choice == "kernel":
            # the fused head kernel over the map as (B·H, 4, rows, W) (a strided view, read in place): on an
            # H100 at N = 65,536 it took 1.76 ms against 2.5 ms for the head as a third GEMM (run 13)
            fast = self._kernel_head(self._head_view(y, N), (B, H, N), histogram, n_valid, floor)
            if fast is not None:
                return fast
        weights = self._row_gemm_matrices(e.dtype, e.device)
        head, head_bias = weights.head, weights.head_bias
        hist, weights = self._head_histogram(histogram, n_valid)
        logits, probs, best = window_gemm_softmax(y, head, head_bias, step=1, pad=1, up=2, virtual_rows=N, out_rows=N,
                                                  histogram=hist, hist_weights=weights, heads=H, floor=floor)
        return logits.view(B, H, N, T), probs.view(B, H, N, T), best.view(B, H, N)

    def _row_gemm_map(self, e: torch.Tensor) -> torch.Tensor:
        """The row linear and the strided and middle convs: e ``(B, H, N, 2d)`` → the map
        ``(B·H, ⌈N/2⌉, 4·W)`` before the head, channel-major (callers checked that the GEMMs apply). The
        first is a row-window GEMM (the linear folded into the strided conv); the middle conv is the band
        kernel over the first's map written position-major (its columns permuted in the weights), or with
        ``APPROXATTN_SEA_MIDDLE=gemm`` a second row-window GEMM over the whole band."""
        from ..kernels.band_conv import band_conv
        from ..kernels.row_window_gemm import window_gemm

        B, H, N, width = e.shape
        w = self._row_gemm_matrices(e.dtype, e.device)
        rows = (N + 1) // 2                     # the strided conv's output rows
        x = e.reshape(B * H, N, width)
        if _middle_choice() == "gemm":
            y = window_gemm(x, w.first, w.first_bias, tap_bias=w.first_taps, step=2, pad=1, virtual_rows=N,
                            out_rows=rows, relu=True)
            return window_gemm(y, w.middle, w.middle_bias, step=1, pad=1, virtual_rows=rows, out_rows=rows, relu=True)
        y = window_gemm(x, w.first_positions, w.first_bias_positions, tap_bias=w.first_taps_positions, step=2, pad=1,
                        virtual_rows=N, out_rows=rows, relu=True)
        return band_conv(y, self.middle.weight, self.middle.bias, relu=True, tile=w.band)

    def _head_view(self, y: torch.Tensor, N: int) -> torch.Tensor:
        """The GEMMs' map ``(B·H, rows, 4·W)`` as the head kernel's ``(B·H, 4, rows, W)`` (a strided view)."""
        return y.view(y.shape[0], (N + 1) // 2, self.splits, self.width).permute(0, 2, 1, 3)

    def _row_gemms_apply(self, e: torch.Tensor, histogram: torch.Tensor | None) -> bool:
        applies = fast_kernel("row_window_gemm", "applies")
        if (applies is None or self.num_heads is not None or e.dtype not in (torch.float16, torch.bfloat16)
                or not applies(e, histogram, *self.parameters())):
            return False
        from ..kernels.row_window_gemm import MAX_HISTOGRAM, MAX_SAMPLES, MAX_SOFTMAX_COLUMNS

        B, H = e.shape[:2]
        # both heads' limits (T ≤ 256 keeps the width ≤ 128 for the head kernel); past them, the layers
        return not (self.columns > MAX_SOFTMAX_COLUMNS or B * H > MAX_SAMPLES
                    or (histogram is not None and histogram.shape[-1] > MAX_HISTOGRAM))

    def best_and_column_sums(self, e: torch.Tensor, *, histogram: torch.Tensor | None = None,
                             n_valid: torch.Tensor | None = None, floor: float = 1e-6):
        """What inference needs when every row keeps its best cell alone (then neither the logits nor
        the probabilities are read): ``(best (B, H, N) int64, column sums of the probabilities
        (B, H, T) fp32)`` from the fused head kernel, which writes neither map (0.8 GB at N = 65,536,
        T = 128); None where that kernel does not apply (then :meth:`logits_and_probs`). Same
        arguments as :meth:`logits_and_probs`."""
        fast = fast_kernel("sea_decoder_head", "fast_decoder_head_best")
        if fast is None or self.num_heads is not None or _head_choice() != "kernel":
            return None
        B, H, N, _ = e.shape
        hist, weights = self._head_histogram(histogram, n_valid)
        # the head kernel reads the row-window GEMMs' map in place. Run 17 also tried the head as GEMMs over
        # that map (two tap GEMMs an output row, the resize composed in): 2.4–5.4 ms against this kernel's
        # 1.65 at N = 65,536 on an H100 (benchmarks/results/h100/run17/call3/head_tune.log), so it went
        y = self._head_view(self._row_gemm_map(e), N) if self._row_gemms_apply(e, histogram) else self._middle(e)
        out = fast(y, self.out.weight, self.out.bias,
                   interpolation_matrix(self.width, self.columns, dtype=y.dtype, device=y.device),
                   rows=N, histogram=hist, hist_weights=weights, heads=H, floor=floor)
        if out is None:
            return None
        return out[0].view(B, H, N), out[1].view(B, H, self.columns)

    def _head_histogram(self, histogram, n_valid):
        """The fused heads' residual inputs: histogram ``(B, H, N, d)`` as ``(B·H, N, d)`` and its resampling
        weights ``(B, d, T)``, or (None, None)."""
        if histogram is None:
            return None, None
        weights = histogram_resampling(n_valid, histogram.shape[-1], self.columns, compute_dtype(histogram.dtype))
        return histogram.flatten(0, 1), weights

    def _kernel_head(self, y, shape, histogram, n_valid, floor):
        """The fused head kernel (``kernels.sea_decoder_head``) over the map ``y (B·H, 4, rows, W)`` (any
        strides) for ``shape = (B, H, N)``: (logits, probs, best) shaped ``(B, H, N, ·)``, or None where it
        does not apply."""
        fast = fast_kernel("sea_decoder_head", "fast_decoder_head")
        if fast is None:
            return None
        B, H, N = shape
        T = self.columns
        hist, weights = self._head_histogram(histogram, n_valid)
        out = fast(y, self.out.weight, self.out.bias, interpolation_matrix(self.width, T, dtype=y.dtype, device=y.device),
                   rows=N, histogram=hist, hist_weights=weights, heads=H, floor=floor)
        if out is None:
            return None
        return out[0].view(B, H, N, T), out[1].view(B, H, N, T), out[2].view(B, H, N)

    def _row_gemm_matrices(self, dtype: torch.dtype, device: torch.device) -> RowGemmWeights:
        """The GEMMs' weights (:class:`RowGemmWeights`), built in fp32 from the layers and cached until a
        parameter's version or address changes. The head's in fp32 (TF32 dots: its logits rank cells), the
        rest in the maps' dtype."""
        from ..kernels.band_conv import band_tile, positions_per_block

        params = tuple(self.parameters())
        positions = positions_per_block(self.width, self.splits)
        # version and address: in-place updates and `.data =` replacements; writes through `.data` in place, or
        # to inference tensors (no version counter), are not seen
        key = (tuple((version(p), p.data_ptr()) for p in params), dtype, device, positions)
        cached = _ROW_GEMM_CACHE.get(self)
        if cached is not None and cached[1] == key and all(r() is p for r, p in zip(cached[0], params)):
            return handed_out(cached[2])
        with torch.inference_mode(False), torch.no_grad():
            W = self.width
            f32 = {"dtype": torch.float32, "device": device}
            down = conv_row_matrices(self.down.weight.to(**f32), W)
            row_weight, row_bias = self.row.weight.to(**f32), self.row.bias.to(**f32)
            first = row_weight.t() @ down                                        # (3, 2d, 4W)
            first_taps = row_bias @ down                                         # (3, 4W)
            first_bias = self.down.bias.to(**f32).repeat_interleave(W)
            middle = conv_row_matrices(self.middle.weight.to(**f32), W)
            middle_bias = self.middle.bias.to(**f32).repeat_interleave(W)
            interp = _interpolation_matrix(W, self.columns).to(**f32)           # (W, T)
            head = conv_row_matrices(self.out.weight.to(**f32), W) @ interp      # (3, 4W, T)
            head_bias = self.out.bias.to(**f32) * interp.sum(0)
            # position-major column w·4 + c holds channel-major column c·W + w
            order = torch.arange(self.splits * W, device=device).view(self.splits, W).t().reshape(-1)
            band = band_tile(self.middle.weight.to(**f32), positions)
            value = RowGemmWeights(first.to(dtype), first_taps, first_bias, middle.to(dtype), middle_bias, head,
                                   head_bias, first[..., order].to(dtype), first_taps[:, order], first_bias[order],
                                   band.to(dtype))
        _ROW_GEMM_CACHE[self] = (tuple(weakref.ref(p) for p in params), key, value)
        return handed_out(value)

    def _head(self, y: torch.Tensor, shape, plus: torch.Tensor | None) -> torch.Tensor:
        """The output conv over the rows ×2 and the width resize (+ ``plus``): ``_middle``'s map →
        logits ``(B, H, N, T)`` for ``shape = (B, H, N)``; what the fused head kernel replaces."""
        B, H, N = shape
        y = conv2d(y, self.out, pad=(1, 1, 1, 1), upsample_rows=2, rows=N)
        return resize_width(y.reshape(B, H, N, self.width), self.columns, plus=plus)

    def _middle(self, e: torch.Tensor) -> torch.Tensor:
        """The CNN up to its output conv: ``(B·H, 4, ⌈N/2⌉, W)`` (or ``(B, 4H, ⌈N/2⌉, W)`` with heads as channels)."""
        _check_heads(self.num_heads, e.shape[1])
        x = _split_channels(linear(e, self.row), self.splits, self.num_heads is not None)
        same = (1, 1, 1, 1)     # the 3×3 convs' padding
        y = conv2d(x, self.down, pad=same, relu=True)
        return conv2d(y, self.middle, pad=same, relu=True)


class CausalDecoder(nn.Module):
    """SEA's causal decoder (OPT): ``Linear_{2d→2·T/4}`` → ChannelSplit(2) → LayerNorm(width) →
    [CausalConv3×3 dilation 2 → ReLU] ×2 → nearest upsample of the width ×4 → Conv1×1(c→H) →
    linear resize to T → LayerNorm(T), with c = 2H (or 2 → 1 per head).

    Row i depends on rows ≤ i only; :meth:`step` computes one new row from a small history
    (``rows_needed`` rows per causal conv), so decoding costs O(T) per token.
    """

    splits = 2
    upsample = 4

    def __init__(self, head_dim: int, columns: int, num_heads: int | None) -> None:
        super().__init__()
        self.columns = columns
        self.num_heads = num_heads
        self.width = math.ceil(columns / self.upsample)
        heads = num_heads or 1
        channels = self.splits * heads
        self.row = nn.Linear(2 * head_dim, self.splits * self.width)
        self.input_norm = nn.LayerNorm(self.width)
        self.conv1 = CausalConv2d(channels, channels, 3, dilation=2)
        self.conv2 = CausalConv2d(channels, channels, 3, dilation=2)
        self.out = nn.Conv2d(channels, heads, 1)
        self.output_norm = nn.LayerNorm(columns)

    def _head_input(self, e: torch.Tensor) -> torch.Tensor:
        _check_heads(self.num_heads, e.shape[1])
        x = _split_channels(linear(e, self.row), self.splits, self.num_heads is not None)
        return layer_norm(x, self.input_norm)

    def _head_output(self, y: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        # the 1×1 conv before the width upsample: repetition commutes with it (same numbers), and
        # it then runs on a quarter of the cells. It writes fp32 for half maps: the final LayerNorm
        # rescales each row's deviations from its mean to unit size, and rows of an undistilled
        # decoder are nearly constant, so half-precision rounding before it would be amplified.
        y = conv2d(y, self.out, out_dtype=compute_dtype(y.dtype)).repeat_interleave(self.upsample, dim=-1)
        y = resize_width(y.reshape(*shape, self.width * self.upsample), self.columns)
        return layer_norm(y, self.output_norm)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e ``(B, H, N, 2d)`` → logits ``(B, H, N, T)``."""
        B, H, N, _ = e.shape
        x = self._head_input(e)
        y = self.conv1(x, relu=True)
        y = self.conv2(y, relu=True)
        return self._head_output(y, (B, H, N))

    def initial_history(self, e_like: torch.Tensor, batch: int, heads: int) -> list[torch.Tensor]:
        """Zero histories for :meth:`step` (``batch·heads`` or ``batch`` CNN samples)."""
        samples = batch if self.num_heads is not None else batch * heads
        like = e_like.new_zeros(1, 1, 1, self.width)
        return [conv.initial_history(like, samples) for conv in (self.conv1, self.conv2)]

    def history_after(self, e: torch.Tensor) -> list[torch.Tensor]:
        """The history :meth:`step` holds after the rows of e ``(B, H, N, 2d)`` from the initial one,
        in one pass: each causal convolution's last ``rows_needed`` input rows (zero rows above row 0)."""
        first = self._head_input(e)
        inputs = (first, self.conv1(first, relu=True))
        history = self.initial_history(e, e.shape[0], e.shape[1])
        return [torch.cat([h, x.to(h.dtype)], dim=2)[:, :, x.shape[2]:] for h, x in zip(history, inputs)]

    def step(self, e_row: torch.Tensor, history: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One new row: e_row ``(B, H, 1, 2d)`` → (logits ``(B, H, 1, T)``, new history)."""
        B, H = e_row.shape[:2]
        x = self._head_input(e_row)
        y, first = self.conv1.step(x, history[0])
        y, second = self.conv2.step(F.relu(y), history[1])
        return self._head_output(F.relu(y), (B, H, 1)), [first, second]
