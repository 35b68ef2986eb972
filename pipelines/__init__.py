"""Runnable entry points: each module has ``main(...)``; ``__main__`` only parses and calls."""
