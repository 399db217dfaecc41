"""Thin entry point: ``python scripts/predict.py model_path=RUN input=PATH output=DIR``."""

from segshare.predict import main

if __name__ == "__main__":
    main()
