"""``python -m components.preprocess``."""

from components.preprocess.cli import app

if __name__ == "__main__":
    app(prog_name="python -m components.preprocess")
