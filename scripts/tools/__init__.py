"""Command-line tools around the bundle (``python -m scripts.tools.<name> --help``); the configs use none of them."""
