"""The implementations against each other and the spec, fed identical inputs."""
