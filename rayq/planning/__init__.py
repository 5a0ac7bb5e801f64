"""Plans: which scheme each layer takes for a threshold, computed from stored scores alone."""
