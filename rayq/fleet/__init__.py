"""`rayq zoo`: compress a fleet of models from one file, skipping those whose inputs are unchanged."""
