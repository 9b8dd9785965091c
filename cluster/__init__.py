"""Multi-node launch flags and scheduler integration (Slurm, Kubernetes)."""
