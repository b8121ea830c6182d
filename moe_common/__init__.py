"""What every service shares: model sources and checkpoints, placement, the tensor
codec, domain errors and gRPC server plumbing. Kept small on purpose."""
