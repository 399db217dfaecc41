"""Thin script: ``python scripts/train.py [overrides]`` == ``segshare-train [overrides]``."""

from segshare.train import main

if __name__ == "__main__":
    main()
