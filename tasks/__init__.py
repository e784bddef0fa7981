"""The problems to learn: dataset loaders (GSM8K, SVAMP, MathQA), the synthetic task generator and
the tiny tokenizer + model built from its corpus."""
