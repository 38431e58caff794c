"""Text: the tokenizer interface, chat templates, tokenizers from every checkpoint format, and
tokenizer training. Below the model; imports no torch."""
