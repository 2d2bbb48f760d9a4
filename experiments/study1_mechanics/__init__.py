"""Study 1: what makes and breaks safety fine-tuning (Jain et al., NeurIPS 2024, arXiv 2407.10264)."""
