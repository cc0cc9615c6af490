"""A training checkpoint as a Hugging Face model folder: the interface between training and serving."""
