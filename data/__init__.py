"""The data path: `python -m data.prepare` (text → tokenizer → shards), `data.stream.build_stream` (the
trainer's resumable packed batches), `python -m data.verify`, and `python -m data.tasks` (long-context tasks).
See docs/data.md.
"""
