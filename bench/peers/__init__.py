"""Ours against what users would pick instead, on one machine, in interleaved rounds:
MLServer (mlserver-sklearn) and the floors for serving, a plain kfp.local pipeline for the
local pipeline. ``python -m bench.peers --help``; ``make bench`` runs it."""
