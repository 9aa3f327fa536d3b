"""A small language model trained from scratch: data, tokenizer, model, training, serving."""

from llm.allocator import keep_freed_memory

keep_freed_memory()   # before any large tensor: why, in llm/allocator.py
