"""Data handling for guilomo: raw data sets -> records, and how a record is put to a model.

Reading: `files` (JSON / JSONL / parquet / save_to_disk files and folders -> rows), the
readers `scienceqa`, `instructions` and `multiple_choice` (rows -> records, in a
`records.ReadReport`), and `split` (the seeded train / validation / test split).
Prompting: `formulations` (rc / mc / generate) and `prompts` (the templates)."""
