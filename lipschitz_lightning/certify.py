"""``python -m lipschitz_lightning.certify``: the command lives in ``lipschitz_lightning.commands.certify``; its
settings are checked before that module (and torch) is imported."""


def main() -> None:
    """The ``lipschitz-certify`` console script."""
    from lipschitz_lightning.commands.cli import command_main

    command_main("certify")


if __name__ == "__main__":
    main()
