"""`python -m service.cli`: the `geoloc` command line."""

from service.cli.main import main

main()
