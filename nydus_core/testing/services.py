"""Fixtures that start real services for tests: docker-registry, containerd, test images."""
