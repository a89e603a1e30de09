"""FlowBack: TARFlow/STARFlow normalizing flows with reverse representation alignment, as a reproducible pipeline."""

__version__ = "0.1.0"
