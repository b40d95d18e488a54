"""The model: loading (Hugging Face format, safetensors), tokenizer, forward/prefill, generation engines."""
