"""Curvature of the cost at the anchor: what the preconditioners are built from (internal).

One module per kind, all on the active coordinates and in float64:

- :mod:`.target`: the cost as a function of the active coordinates, on a float64 twin;
- :mod:`.ggn`: the Gauss–Newton / Fisher diagonal (exact, or sampled for many outputs) and matrix;
- :mod:`.ggn_products`: Gauss–Newton-vector products, top eigenpairs, Hutchinson diagonals;
- :mod:`.kronecker`: K-FAC's per-layer Kronecker factors;
- :mod:`.hessian`: the exact Hessian from Hessian-vector products, Hutchinson's diagonal;
- :mod:`.hesscale`: HesScale's diagonal for models whose forward is a chain of layers
  (:mod:`.layer_chain` traces it);
- :mod:`.optimizer_state`: Adam's bias-corrected moments, from an optimizer or a file.
"""
