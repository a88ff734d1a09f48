"""phi3fast.training: LoRA / QLoRA fine-tuning.

config.py (TrainConfig) · trainer.py (the Trainer: setup, step, checkpoint, evaluate) · data.py (JSONL rows to
batches, data order) · loss.py (chunked cross-entropy) · checkpoint.py (atomic, verified checkpoints) ·
distributed.py (torchrun data parallelism) · precision.py (compute dtype, fp16 loss scaling) · metrics.py.
The public entry point is phi3fast.train (train, TrainConfig).
"""
