"""Balance: R&B mixture training on Ray Train."""
