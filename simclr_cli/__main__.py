"""`python -m simclr_cli` runs the same app as the `simclr` command (torchrun uses this entry)."""

from simclr_cli.cli import main

if __name__ == "__main__":
    main()
