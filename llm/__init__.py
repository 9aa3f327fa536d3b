"""A small language model trained from scratch: data, tokenizer, model, training, serving."""
