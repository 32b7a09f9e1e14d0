"""Curvature backends and inverse-HVP solvers.

:mod:`.protocol` (the backend interface and its declared capabilities), :mod:`.probe` (what one
forward pass tells about the model), one module per curvature (:mod:`.head` on
:mod:`.softmax_head`, :mod:`.exact`, :mod:`.gauss_newton`, :mod:`.kronecker` on :mod:`.kfac`),
what the network backends share (:mod:`.network`, :mod:`.differentiation`), which backend runs
(:mod:`.selection`), and the solvers with their one registry (:mod:`.solvers`).
"""
