"""Reducers: what the engine makes of each layer's factors, one module per reduction
(materialised per-sample gradients, norms, the clipped sum, inner products between two
sets, projections). Each takes the engine (:class:`indivgrad_cuda.PerSampleGrads`, for its
captures and options) and runs one call; the engine's methods are these functions."""
