"""Method trainers (installed as ``diffdistill.trainers``)."""
