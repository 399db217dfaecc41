"""Thin entry point: ``python scripts/export.py model_path=RUN output=X.zip``."""

from segshare.export import main

if __name__ == "__main__":
    main()
