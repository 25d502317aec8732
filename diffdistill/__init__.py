"""diffdistill: turn multi-step diffusion models into fast one- to few-step generators."""

__version__ = "0.1.0"
