"""Protocol handlers used by server.py (kept apart so server.py stays a readable route list)."""
