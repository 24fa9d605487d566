"""Out-of-distribution evaluation: corruptions, shifted-set loaders, metrics, reports."""
