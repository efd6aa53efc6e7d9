"""Report: PNG plots and a self-contained HTML page for a pipeline or training run."""
