"""`python -m seekax ...` is the `seekax` command."""

from seekax.runtime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
