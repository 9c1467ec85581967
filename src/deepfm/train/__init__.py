"""Training: the loop, optimisers and metrics."""
