"""Datasets, masking and collation for pretraining and fine-tuning."""
