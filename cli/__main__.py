"""`python -m geomoe.cli`: the same as the `geomoe` command."""

from geomoe.cli.main import main

main()
