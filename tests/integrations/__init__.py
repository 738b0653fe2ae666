"""The framework integrations: Transformers, Lightning, Flax."""
