"""``python -m components.train``."""

from components.train.cli import app

if __name__ == "__main__":
    app(prog_name="python -m components.train")
