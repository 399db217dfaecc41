"""Thin script: ``python scripts/preprocess.py data.root=DIR``."""

from segshare.preprocess import main

if __name__ == "__main__":
    main()
