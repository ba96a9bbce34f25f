"""`python -m training train|evaluate|export|build-repository|import`."""

from training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
