"""SophiaG under torch.distributed (DDP, FSDP2) on CPU."""
