"""`python -m fednested`: the same command line as the `fednested` console script."""

from fednested.cli import main

if __name__ == "__main__":
    main()
