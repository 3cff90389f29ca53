"""The integer model: ``fewbits.convert(qmodel)``."""
from .convert import Chain, IntegerModel, convert
from .layers import IntegerConv, IntegerEmbedding, IntegerLinear, IntegerMaxPool, OutputGrid

__all__ = ["convert", "IntegerModel", "Chain", "IntegerLinear", "IntegerConv", "IntegerEmbedding",
           "IntegerMaxPool", "OutputGrid"]
