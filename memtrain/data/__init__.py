"""The data path: `python -m memtrain.data.prepare` (text → tokenizer → shards), `memtrain.data.stream.build_stream` (the
trainer's resumable packed batches), `python -m memtrain.data.verify`, and `python -m memtrain.data.tasks` (long-context tasks).
See docs/data.md.
"""
