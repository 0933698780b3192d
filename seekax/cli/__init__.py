"""The `seekax` command line: `main.main` builds the parser; one module per subcommand."""
