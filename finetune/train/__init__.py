"""Training: the loop (loop.py) over a feed (feed.py), its state (state.py) and checkpoints, the
callbacks around the steps (callbacks.py), optimizer, signals, metrics, and the stages (stages.py)."""
