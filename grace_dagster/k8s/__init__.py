"""Kubernetes manifests rendered from the model registry, and the NRP policy checked over them."""
