"""The run configs (YAML), installed as ``diffdistill.configs`` so an installed package finds
them by relative name: ``diffdistill train lcd/toy_lora.yaml``."""
