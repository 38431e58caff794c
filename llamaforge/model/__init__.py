"""The model: its config and presets, the Llama transformer (one readable module), LoRA and
prefix adapters, weight-only quantisation, the CPU decode kernel, and generation."""
