"""``python -m lipschitz_lightning.report``: the command lives in ``lipschitz_lightning.commands.report``."""


def main() -> int:
    """The ``lipschitz-report`` console script: a user's error (the plots' extra missing) as one line."""
    from lipschitz_lightning.commands.report import main as report
    from lipschitz_lightning.errors import LipschitzLightningError, exit_with

    try:
        return report()
    except LipschitzLightningError as error:
        exit_with(error)


if __name__ == "__main__":
    raise SystemExit(main())
