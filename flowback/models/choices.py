"""The samplers' named choices, defined once: the params schema and the code that implements them both import these
(this module imports nothing, so the schema stays cheap to load)."""

SOLVERS = ("sequential", "jacobi", "gs_jacobi")  # how a block is inverted (jacobi.py)
JACOBI_INITS = ("noise", "zeros")  # the first Jacobi iterate (jacobi.py)
