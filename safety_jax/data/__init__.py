"""Data: tokenised text datasets, fixed-shape batches, and the synthetic safety world of Jain et al. (2024)."""
