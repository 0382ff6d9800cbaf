"""dip: Deep Image Prior image restoration with no training data."""
__version__ = "0.1.0"
