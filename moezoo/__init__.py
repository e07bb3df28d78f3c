"""moezoo: sparse Mixture-of-Experts models beyond language modelling."""
