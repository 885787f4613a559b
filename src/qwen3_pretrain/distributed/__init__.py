"""Device and backend selection, device mesh, and the parallelisms applied to the model from outside."""
