"""Building blocks shared by the method families: random matrices, feature maps,
kernel (linear) attention given features, sequence projections, exact attention."""
