"""Where bytes live: storage (local or S3), runs, Σ checkpoints, data files, edited checkpoints."""
