"""Several service processes (replicas) on one database: each follows the others' writes and activations."""
