"""`python -m gpudeck.cli`: the same as the `gpudeck` command."""

from gpudeck.cli.main import main

if __name__ == "__main__":
    main()
