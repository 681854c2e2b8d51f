"""hueyserve: serve machine-learning models on CPUs through a Huey task queue on Redis."""
