"""The operator: places ModelDeployments on GPUs and folds agent reports into their status."""
