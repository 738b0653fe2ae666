"""sophia.jax against the spec, optax and itself."""
