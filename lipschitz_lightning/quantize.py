"""``python -m lipschitz_lightning.quantize``: the command lives in ``lipschitz_lightning.commands.quantize``;
its settings are checked before that module (and torch) is imported."""


def main() -> None:
    """The ``lipschitz-quantize`` console script."""
    from lipschitz_lightning.commands.cli import command_main

    command_main("quantize")


if __name__ == "__main__":
    main()
