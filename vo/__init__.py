"""Visual odometry pipeline: sources, tracker, backend, evaluation and training."""
