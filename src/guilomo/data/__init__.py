"""Data handling for guilomo: readers (`readers`), prompt templates (`prompts`) and the
PreparedDataset artifact (`prepared`)."""
