"""Representation alignment (REPA) for flows: frozen encoders (encoder.py, pretrain.py), the projector, losses and
target grids (loss.py), the position grammar (positions.py), the gradient strategies (strategies.py) and the reverse
path's three gradient graphs (reverse.py).

Import from the submodules: this package imports nothing itself, so a stage that needs only the encoder does not
depend on (and is not rerun for a change to) the alignment losses or the flow.
"""
