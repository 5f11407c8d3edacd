"""The `geomoe` command line: one thin module per command group over library functions."""
