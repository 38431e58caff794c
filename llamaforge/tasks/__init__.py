"""Tasks for the one trainer: each a dataset, a loss and metrics (classify; later sft, pretrain)."""
