"""moss: the thin layer users touch. It wraps a transformers model's linear layers with MOSS
adapters (:func:`get_moss_model`), routes every batch once per forward, saves and loads the
adapters, and carries the ``moss`` command line (``moss info``, ``moss bench``)."""

from .config import MossConfig
from .model import MossModel, get_moss_model

__all__ = ["MossConfig", "MossModel", "get_moss_model"]
