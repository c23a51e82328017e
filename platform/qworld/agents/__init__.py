"""Model-free agents whose Q-values we invert."""
