"""Models in and out of phi3fast: Llama-family and GGUF checkpoints in (`convert`), GGUF and Ollama out (`export`)."""
