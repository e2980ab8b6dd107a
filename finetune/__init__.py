"""LoRA fine-tuning of instruction-tuned causal LMs: data, prompt rendering, training, adapter export."""
