"""Inspectors of trained checkpoints: `python -m memtrain.train.inspect registers | attention | registers-experiment`.

capture.py (hooks: hidden states + attention probabilities, model code untouched; titans_capture.py the same for
Titans MAC / MAG / MAL, whose attention bypasses `Attention.forward`), registers.py (norms, outliers,
attention shares), attention_maps.py (maps, Memory Transformer quadrants), gates.py (Titans θ, η, α), plots.py,
experiment.py (the registers preset). See docs/inspect.md.
"""
