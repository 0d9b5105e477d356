"""Client-side pieces: the split-client wrapper that drives a cluster's D2D chain."""

from clients.split_client import ClusterIdentity, SplitClusterClient

__all__ = ["ClusterIdentity", "SplitClusterClient"]
