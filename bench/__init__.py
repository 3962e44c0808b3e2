"""``python -m bench``: how close our fine-tuning runs to this CPU's limit, and against transformers.Trainer."""
