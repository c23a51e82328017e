"""qworld: goal-conditioned Q-learning on Ray, and world models extracted from its Q-values."""

__version__ = "0.1.0"
