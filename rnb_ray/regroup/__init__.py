"""Regroup: embed a corpus and cluster it into domains on Ray Data."""
