"""The integer model: ``fewbits.convert(qmodel)``."""
from .convert import Chain, IntegerModel, convert
from .layers import IntegerAdd, IntegerConv, IntegerEmbedding, IntegerLinear, IntegerMaxPool, OutputGrid

__all__ = ["convert", "IntegerModel", "Chain", "IntegerLinear", "IntegerConv", "IntegerEmbedding",
           "IntegerMaxPool", "IntegerAdd", "OutputGrid"]
