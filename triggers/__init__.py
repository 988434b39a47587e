"""Cloud Function entry points; see ``triggers/main.py``."""
