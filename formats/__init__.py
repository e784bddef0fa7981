"""The bottom layer: the record every dataset produces, the paper's prompt format, and loading and
saving Hugging Face tokenizers and models. Imports no other package of the project."""
