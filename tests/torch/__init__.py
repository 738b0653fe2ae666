"""sophia.torch against the spec and torch.optim's contracts."""
