"""Thin entry point: ``python scripts/crossval.py runs=[RUN0,RUN1,...] output=DIR``."""

from segshare.crossval import main

if __name__ == "__main__":
    main()
