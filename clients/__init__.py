"""Client-side pieces: the split client that drives a cluster's D2D chain, and SL inference."""

from clients.split_client import SplitClusterClient

__all__ = ["SplitClusterClient"]
