"""Tests on a real multi-node Ray cluster started by cluster/local/start.sh (one per package run)."""
