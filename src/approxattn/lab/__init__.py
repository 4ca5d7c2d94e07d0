"""The approximation lab: every registered method against exact softmax attention on real inputs.

``approxattn compare`` (see :mod:`approxattn.lab.cli`) runs the registered methods on Q, K, V
captured from real pretrained models (MiniLM-L6, SmolLM2-135M) and on synthetic inputs, and
reports error, time, memory, their dependence on sequence length and budget, an analysis of the
attention matrices themselves (spectrum, sparse + low-rank split) and FLuRKA's error against its
constituents'. ``approxattn advise`` recommends a method and budget from those measurements.

The lab uses only the public API of approxattn.
"""
