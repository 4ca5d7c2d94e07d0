"""Named sweeps. ``headline``: the issue's side-by-side run (B=1, H=16, d=64, bf16, N = 1K…128K; SDPA's
cuDNN and default backends from N=16K);
``sweep``: the other axes (batch×heads, head dim, dtype, feature budget) at a few lengths;
``quick``: a smoke test; ``sea``: SEA's sparse step and module, forward only (``bench/sparse.py``);
``crossover``: the short lengths where SDPA and the fused paths cross, each timed as called
from Python and replayed from CUDA graphs (the GPU's own time, without launch overhead);
``flurka``: FLuRKA against its two constituents over stated (r, m), the paper's speed claims."""

from __future__ import annotations

from .case import Case, graphed_label

HEADLINE_SEQ = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FLEX_SEQ = (4096, 65536)
# SDPA's other backends (cuDNN, torch's default dispatch) beside the flash one the targets are set against:
# from here on, where the speed-up question lies; shorter lengths would only add run time
SDPA_BACKENDS_MIN_SEQ = 16384


def sdpa_family(seq: int, causal: bool, **shape) -> list[Case]:
    suffix = " causal" if causal else ""
    cases = [Case("sdpa", "SDPA flash" + suffix, seq, causal, method="softmax", **shape)]
    if seq >= SDPA_BACKENDS_MIN_SEQ:
        cases += [Case("sdpa", f"SDPA {name}{suffix}", seq, causal, method="softmax", options={"backend": backend},
                       **shape) for name, backend in (("cuDNN", "cudnn"), ("default", "default"))]
    return cases


def noncausal_family(seq: int, **shape) -> list[Case]:
    return sdpa_family(seq, False, **shape) + [
        Case("fused", "FAVOR+ m=256 (fused)", seq, False, method="performer", options={"num_features": 256}, **shape),
        Case("reference", "FAVOR+ m=256 (PyTorch ref)", seq, False, method="performer",
             options={"num_features": 256}, **shape),
        Case("performer-pytorch", "performer-pytorch m=256", seq, False, feature_dim=256, **shape),
        Case("fused", "ReLU features m=256 (fused)", seq, False, method="performer",
             options={"num_features": 256, "kernel": "relu"}, **shape),
        Case("fused", "elu+1 linear (fused)", seq, False, method="linear", **shape),
        Case("fused", "FLuRKA r=128 m=64 (fused)", seq, False, method="flurka-performer",
             options={"rank": 128, "num_features": 64}, **shape),
        Case("fused", "FLuRKA r=128 m=256 (fused)", seq, False, method="flurka-performer",
             options={"rank": 128, "num_features": 256}, **shape),
        Case("reference", "Linformer r=128 (PyTorch)", seq, False, method="linformer", options={"rank": 128},
             **shape),
    ]


def causal_family(seq: int, **shape) -> list[Case]:
    cases = sdpa_family(seq, True, **shape) + [
        Case("fused", "elu+1 linear causal (fused)", seq, True, method="linear", **shape),
        Case("fla", "fla chunk_linear_attn K=64 (elu+1 in PyTorch)", seq, True, feature_dim=64,
             options={"feature_map": "elu"}, **shape),
        Case("fla", "fla chunk_linear_attn K=256 (features given)", seq, True, feature_dim=256, **shape),
        Case("fused", "ReLU features m=256 causal (fused)", seq, True, method="performer",
             options={"num_features": 256, "kernel": "relu"}, **shape),
        Case("fused", "FAVOR+ m=256 causal, no stabiliser (fused)", seq, True, method="performer",
             options={"num_features": 256, "stabilize": False}, **shape),
        Case("fused", "FAVOR+ m=256 causal, prefix max (fused)", seq, True, method="performer",
             options={"num_features": 256}, **shape),
    ]
    if seq in FLEX_SEQ:  # torch.compile per shape costs tens of seconds: a few lengths only
        cases.append(Case("flex", "FlexAttention causal (compiled)", seq, True, method="softmax", **shape))
    if seq <= 16384:
        cases += [
            Case("reference", "elu+1 linear causal (PyTorch ref)", seq, True, method="linear", **shape),
            Case("reference", "FAVOR+ m=256 causal (PyTorch ref, prefix max)", seq, True, method="performer",
                 options={"num_features": 256}, **shape),
        ]
    return cases


def headline(seqs=HEADLINE_SEQ) -> list[Case]:
    cases: list[Case] = []
    for seq in seqs:
        cases += noncausal_family(seq) + causal_family(seq)
    return cases


def sweep(seqs=(4096, 16384, 65536)) -> list[Case]:
    """Batch×heads, head dim, dtype and feature budget around the headline shape."""
    cases: list[Case] = []
    for seq in seqs:
        for batch, heads in ((4, 16), (1, 32)):
            cases += [Case("sdpa", "SDPA flash", seq, False, batch=batch, heads=heads, method="softmax"),
                      Case("fused", "FAVOR+ m=256 (fused)", seq, False, batch=batch, heads=heads,
                           method="performer", options={"num_features": 256})]
        cases += [Case("sdpa", "SDPA flash", seq, False, head_dim=128, heads=8, method="softmax"),
                  Case("fused", "FAVOR+ m=256 (fused)", seq, False, head_dim=128, heads=8, method="performer",
                       options={"num_features": 256}),
                  Case("fused", "elu+1 linear causal (fused)", seq, True, head_dim=128, heads=8, method="linear")]
        for dtype in ("float16", "float32"):
            cases += [Case("fused", "FAVOR+ m=256 (fused)", seq, False, dtype=dtype, method="performer",
                           options={"num_features": 256}),
                      Case("fused", "elu+1 linear causal (fused)", seq, True, dtype=dtype, method="linear")]
        for m in (64, 128, 512):
            cases.append(Case("fused", f"FAVOR+ m={m} (fused)", seq, False, method="performer",
                              options={"num_features": m}))
        cases.append(Case("fused", "FAVOR+ m=256 GQA 16/4 (fused)", seq, False, kv_heads=4, method="performer",
                          options={"num_features": 256}))
    return cases


CROSSOVER_SEQ = (1024, 2048, 4096, 8192)


def graphed(case: Case) -> Case:
    """``case`` replayed from CUDA graphs, under its :func:`graphed_label`."""
    return Case(**{**case.__dict__, "label": graphed_label(case.label), "graphed": True})


def crossover(seqs=CROSSOVER_SEQ) -> list[Case]:
    """SDPA flash and the fused paths of the cross-over targets, eager and graphed (the bench's own
    graphs of the whole step), and the fused paths' inference through ``approxattn.graphed``."""
    wanted = ("SDPA flash", "FAVOR+ m=256 (fused)", "elu+1 linear (fused)", "SDPA flash causal",
              "elu+1 linear causal (fused)")
    cases: list[Case] = []
    for seq in seqs:
        eager = [c for c in noncausal_family(seq) + causal_family(seq) if c.label in wanted]
        inference = [Case(**{**c.__dict__, "impl": "graphed", "modes": ("fwd",),
                             "label": c.label.replace("(fused)", "(approxattn.graphed inference)")})
                     for c in eager if c.impl == "fused"]
        cases += eager + [graphed(c) for c in eager] + inference
    return cases


FLURKA_SEQ = (16384, 65536)
FLURKA_KERNEL_FEATURES = (256, 512, 1024)  # the ceiling 2m/(r + m) rises with m towards 2x
FLURKA_KERNEL_RANKS = (16, 32, 64, 128)
FLURKA_LOWRANK = ((128, 32), (128, 64), (256, 64))  # (r, m) with m < r


def flurka(seqs=FLURKA_SEQ) -> list[Case]:
    """FLuRKA's speed claims, each beside the constituent it is measured against, at stated (r, m):
    against Performer (FAVOR+) with the same m at r < m, and against Linformer with the same r at m < r.
    The multiply-accumulate ceilings are 2m / (r + m) and 2r / (r + m) (``shared`` reference §4.3)."""
    cases: list[Case] = []
    for seq in seqs:
        for m in FLURKA_KERNEL_FEATURES:
            cases.append(Case("fused", f"FAVOR+ m={m} (fused)", seq, False, method="performer",
                              options={"num_features": m}))
            cases += [Case("fused", f"FLuRKA r={r} m={m} (fused)", seq, False, method="flurka-performer",
                           options={"rank": r, "num_features": m}) for r in FLURKA_KERNEL_RANKS]
        for r in sorted({r for r, _ in FLURKA_LOWRANK}):
            cases.append(Case("reference", f"Linformer r={r} (PyTorch)", seq, False, method="linformer",
                              options={"rank": r}))
        cases += [Case("fused", f"FLuRKA r={r} m={m} (fused)", seq, False, method="flurka-performer",
                       options={"rank": r, "num_features": m}) for r, m in FLURKA_LOWRANK]
    return cases


def quick() -> list[Case]:
    return noncausal_family(4096)[:3] + causal_family(4096)[:3]


from .sparse import sea  # noqa: E402  (SEA's sparse step and the sea module)

PRESETS = {"headline": headline, "sweep": sweep, "quick": quick, "sea": sea, "crossover": crossover,
           "flurka": flurka}
