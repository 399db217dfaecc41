"""Thin entry point: ``python scripts/evaluate.py pred=DIR ref=DIR output=DIR``."""

from segshare.evaluate import main

if __name__ == "__main__":
    main()
