"""hueyserve: serve scikit-learn models on CPUs through a Huey task queue on Redis."""
