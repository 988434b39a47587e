"""``python -m components.evaluate``."""

from components.evaluate.cli import app

if __name__ == "__main__":
    app(prog_name="python -m components.evaluate")
