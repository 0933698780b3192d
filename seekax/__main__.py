"""`python -m seekax ...` is the `seekax` command."""

from seekax.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
