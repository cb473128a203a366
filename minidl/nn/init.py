"""Weight initialisers (in place, like torch.nn.init). Filled in by the engine-core work."""
