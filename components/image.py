"""The container image every component runs in on a cluster (the local runner uses the current interpreter)."""
import os

IMAGE = os.environ.get("DSAFORGE_IMAGE", "dsaforge/dsaforge:0.1.0")
