"""Load generator for the server: `python bench/load.py --help`."""
