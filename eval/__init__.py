"""Evaluation harness (installed as ``diffdistill.eval``)."""
