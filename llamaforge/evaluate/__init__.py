"""Evaluation: task definitions (each file reader with its prompt, shared with training), metrics
and figures, the next-token loss and perplexity, and scoring a model on a task."""
