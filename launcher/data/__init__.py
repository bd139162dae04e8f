"""The data, on the submitting host (validated before any process starts) and on every rank.

formats.py (the data-format registry: one object per data.format), files.py (jsonl / json /
csv / parquet / hub readers with line-numbered problems), rows.py (validate, convert, split,
tokenizer preparation and the train/serve contract).
"""
