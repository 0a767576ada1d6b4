"""Training: losses, router metrics and the train step."""
